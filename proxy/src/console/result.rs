//! A console result set and its encoding as `RowDescription`, `DataRow`s
//! and `CommandComplete`, all in text format.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};

use crate::wire;

/// The type a column is described with (the values are text either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `text`.
    Text,
    /// `int8`.
    Int,
    /// `bool`.
    Bool,
    /// `float8`.
    Float,
}

impl Kind {
    fn oid(self) -> u32 {
        match self {
            Kind::Text => 25,
            Kind::Int => 20,
            Kind::Bool => 16,
            Kind::Float => 701,
        }
    }
}

/// Rows to send for a `SHOW`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResultSet {
    /// Column names and types.
    pub columns: Vec<(&'static str, Kind)>,
    /// Values as text; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    /// An empty result with these columns.
    pub fn new(columns: &[(&'static str, Kind)]) -> Self {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many values as columns).
    pub fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// The values of column `name`, for tests and the status page.
    pub fn column(&self, name: &str) -> Vec<Option<&str>> {
        let Some(i) = self.columns.iter().position(|(c, _)| *c == name) else {
            return Vec::new();
        };
        self.rows.iter().map(|r| r[i].as_deref()).collect()
    }

    /// Appends the messages: description, rows, `CommandComplete`.
    pub fn encode(&self, tag: &str, out: &mut BytesMut) {
        let fields = self
            .columns
            .iter()
            .map(|(name, kind)| {
                FieldDescription::new((*name).to_string(), 0, 0, kind.oid(), -1, -1, 0)
            })
            .collect();
        wire::encode(&RowDescription::new(fields), out);
        for row in &self.rows {
            let mut data = BytesMut::new();
            for v in row {
                match v {
                    Some(v) => {
                        data.put_i32(v.len() as i32);
                        data.put_slice(v.as_bytes());
                    }
                    None => data.put_i32(-1),
                }
            }
            wire::encode(&DataRow::new(data, row.len() as i16), out);
        }
        wire::command_complete(tag, out);
    }
}

/// A value as text.
pub fn v(x: impl ToString) -> Option<String> {
    Some(x.to_string())
}

/// A boolean as PostgreSQL writes it: `t` or `f`.
pub fn flag(b: bool) -> Option<String> {
    v(if b { "t" } else { "f" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    #[test]
    fn encodes_description_rows_and_tag() {
        let mut rs = ResultSet::new(&[("name", Kind::Text), ("n", Kind::Int)]);
        rs.push(vec![v("a"), v(1)]);
        rs.push(vec![None, v(2)]);
        assert_eq!(rs.column("name"), [Some("a"), None]);
        let mut out = BytesMut::new();
        rs.encode("SHOW", &mut out);
        let mut tags = Vec::new();
        while let Some(f) = wire::split_frame(&mut out, wire::MAX_MESSAGE_LEN).unwrap() {
            let f: Frame = f;
            tags.push(f.tag);
        }
        assert_eq!(tags, [b'T', b'D', b'D', b'C']);
    }
}
