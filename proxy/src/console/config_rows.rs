//! `SHOW CONFIG`: the configuration in force as `key`, `value`,
//! `default`, `changeable` rows (as PgBouncer's), secrets masked.

use std::collections::BTreeMap;

use super::result::{Kind, ResultSet, flag, v};
use crate::config::{Config, PoolConfig, ProxyConfig, RoutingConfig};

/// Keys a reload does not change (they need a restart).
const FIXED: &[&str] = &[
    "proxy.listen",
    "proxy.admin_listen",
    "proxy.workers",
    "routing.monitor_interval",
    "routing.probe_timeout",
];

/// The rows of `SHOW CONFIG`.
pub fn config_rows(config: &Config) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("key", Kind::Text),
        ("value", Kind::Text),
        ("default", Kind::Text),
        ("changeable", Kind::Bool),
    ]);
    let defaults = {
        let mut d = BTreeMap::new();
        flatten("proxy", &to_value(&ProxyConfig::default()), &mut d);
        flatten("routing", &to_value(&RoutingConfig::default()), &mut d);
        flatten("pool", &to_value(&PoolConfig::default()), &mut d);
        d
    };
    let mut values = BTreeMap::new();
    flatten("", &to_value(config), &mut values);
    for (key, value) in values {
        let secret = key.ends_with("password");
        let changeable = !FIXED.contains(&key.as_str()) && !key.starts_with("nodes");
        rs.push(vec![
            v(&key),
            if secret { v("********") } else { v(value) },
            defaults.get(&key).cloned(),
            flag(changeable),
        ]);
    }
    rs
}

fn to_value<T: serde::Serialize>(t: &T) -> toml::Value {
    toml::Value::try_from(t).unwrap_or(toml::Value::Table(Default::default()))
}

/// `a.b`, `nodes[0].name`, … → the value as TOML text (strings bare).
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&join(k), v, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_once_secrets_masked_defaults_shown() {
        let mut c = Config::demo(
            ("127.0.0.1".into(), 5432),
            vec![("127.0.0.1".into(), 5433)],
            "app",
            "s3cret",
        );
        c.proxy.admin_users = vec!["app".into()];
        let rs = config_rows(&c);
        let keys = rs.column("key");
        let value = |k: &str| {
            let i = keys
                .iter()
                .position(|x| *x == Some(k))
                .unwrap_or_else(|| panic!("{k}"));
            (
                rs.rows[i][1].clone(),
                rs.rows[i][2].clone(),
                rs.rows[i][3].clone(),
            )
        };
        assert_eq!(value("users[0].password"), (v("********"), None, v("t")));
        assert!(!rs.rows.iter().any(|r| r[1].as_deref() == Some("s3cret")));
        assert_eq!(value("nodes[1].port"), (v(5433), None, v("f")));
        assert_eq!(
            value("proxy.listen"),
            (v("127.0.0.1:6432"), v("127.0.0.1:6432"), v("f"))
        );
        assert_eq!(
            value("proxy.admin_users"),
            (v("[\"app\"]"), v("[]"), v("t"))
        );
        let max_wait = value("routing.max_wait");
        assert_eq!(max_wait.0, max_wait.1);
        assert!(keys.iter().all(|k| k.is_some()));
        let mut sorted = keys.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len(), "keys are unique");
    }
}
