//! The status page served at `/` on the admin listener: one self-contained
//! HTML page (inline style and script, allowed by hash in its
//! `Content-Security-Policy`; nothing fetched from elsewhere). It is
//! rendered from the `/status` document, so it shows nothing `/status` does
//! not, as a plain table that works without JavaScript; the script then
//! polls `/status` every second and redraws it with lag sparklines, the
//! share of reads per node, fallbacks by reason and token waits.
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

const SCRIPT: &str = include_str!("status_page/script.js");
const STYLE: &str = include_str!("status_page/style.css");

fn hash(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
}

/// The page's `Content-Security-Policy`: its own inline script and style
/// (by hash), requests to its own origin only, nothing else.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        )
    })
}

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn bytes(v: &Value) -> String {
    match v.as_u64() {
        None => "—".into(),
        Some(n) if n < 1024 => format!("{n} B"),
        Some(n) if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / 1048576.0),
    }
}

fn secs(v: &Value) -> String {
    match v.as_f64() {
        None => "—".into(),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

/// A sparkline of `values` (nulls are gaps) as inline SVG, 160 × 28, the
/// same shape the script draws.
fn spark(values: &[Value]) -> String {
    let (w, h) = (160.0, 28.0);
    let known: Vec<f64> = values.iter().filter_map(Value::as_f64).collect();
    let mut out = r#"<svg class="spark" width="160" height="28" viewBox="0 0 160 28"><line x1="0" y1="27" x2="160" y2="27"></line>"#.to_string();
    if !known.is_empty() {
        let max = known.iter().copied().fold(1e-9, f64::max);
        let n = values.len();
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = v.as_f64()?;
                let x = if n < 2 {
                    w
                } else {
                    i as f64 * w / (n - 1) as f64
                };
                Some(format!("{x:.1},{:.1}", h - 1.0 - v / max * (h - 4.0)))
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}"></polyline>"#,
            points.join(" ")
        );
    }
    out.push_str("</svg>");
    out
}

/// The page for the `/status` document `status`.
pub fn render(status: &Value) -> String {
    let nodes = status["topology"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let history = status["history"].as_array().cloned().unwrap_or_default();
    let stats = status["stats"].as_array().cloned().unwrap_or_default();
    let total_reads: u64 = stats.iter().filter_map(|r| r["reads"].as_u64()).sum();
    let mut rows = String::new();
    for n in &nodes {
        let name = n["name"].as_str().unwrap_or_default();
        let role = n["role"].as_str().unwrap_or("unknown");
        let healthy = n["healthy"].as_bool().unwrap_or(false);
        let lags = history
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["lag_seconds"].as_array().cloned())
            .unwrap_or_default();
        let reads: u64 = stats
            .iter()
            .filter(|r| r["node"] == name)
            .filter_map(|r| r["reads"].as_u64())
            .sum();
        let share = (reads * 100).checked_div(total_reads).unwrap_or(0);
        let _ = write!(
            rows,
            r#"<tr data-node="{n_}" data-role="{r_}"><td>{n_}</td><td class="role-{r_}">{r_}</td><td class="{hc}">{ht}</td><td class="num">{tl}</td><td class="num">{lsn}</td><td class="num">{lb}</td><td class="num">{ls}</td><td>{sp}</td><td><svg class="bar" width="100" height="12"><rect class="full" x="0" y="0" width="100" height="12"></rect><rect class="part" x="0" y="0" width="{share}" height="12"></rect></svg> {share} % ({reads})</td></tr>"#,
            n_ = esc(name),
            r_ = esc(role),
            hc = if healthy { "ok" } else { "down" },
            ht = if healthy { "healthy" } else { "ejected" },
            tl = esc(&text(&n["timeline"])),
            lsn = esc(&text(&n["lsn"])),
            lb = bytes(&n["lag_bytes"]),
            ls = secs(&n["lag"]),
            sp = spark(&lags),
        );
    }
    let mut fallbacks = std::collections::BTreeMap::<String, u64>::new();
    let (mut waits, mut waited) = (0u64, 0f64);
    for r in &stats {
        if let Some(f) = r["fallbacks"].as_object() {
            for (k, v) in f {
                *fallbacks.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        waits += r["token_waits"].as_u64().unwrap_or(0);
        waited += r["token_wait_seconds"].as_f64().unwrap_or(0.0);
    }
    let fallback_rows: String = fallbacks
        .iter()
        .map(|(k, v)| format!(r#"<tr><td>{}</td><td class="num">{v}</td></tr>"#, esc(k)))
        .collect();
    let wait_text = if waits == 0 {
        "0 reads waited for a replica to reach their token.".to_string()
    } else {
        format!(
            "{waits} reads waited for a replica to reach their token, {} on average.",
            secs(&Value::from(waited / waits as f64))
        )
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lagrouter-proxy status</title><style>{STYLE}</style></head>
<body data-polls="0">
<header><h1>lagrouter-proxy</h1><p id="summary">policy {policy} · {clients} clients · {total_reads} reads · up {uptime} s</p><p id="error"></p></header>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>role</th><th>health</th><th>timeline</th><th>LSN</th><th>lag</th><th>lag (time)</th><th>lag, last 5 minutes</th><th>reads served</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Reads that did not go where the policy wanted</h2>
<table id="fallbacks"><thead><tr><th>fallback reason</th><th>reads</th></tr></thead><tbody>{fallback_rows}</tbody></table>
<p id="waits">{wait_text}</p>
<noscript><p>JavaScript is off: this is the state when the page was loaded; reload it for fresh numbers.</p></noscript>
<footer>From <a href="/status">/status</a>, refreshed every second. Metrics for Prometheus: <a href="/metrics">/metrics</a>.</footer>
<script>{SCRIPT}</script>
</body></html>
"#,
        policy = esc(&text(&status["policy"])),
        clients = status["clients"].as_u64().unwrap_or(0),
        uptime = status["uptime_seconds"].as_f64().unwrap_or(0.0).round(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({
            "topology": {"nodes": [
                {"name": "primary", "role": "primary", "healthy": true, "lsn": "0/3000060", "lag_bytes": 0, "lag": 0.0, "timeline": 1},
                {"name": "<r1>", "role": "replica", "healthy": false, "lsn": null, "lag_bytes": 2048, "lag": 1.5, "timeline": null}
            ]},
            "history": [{"name": "<r1>", "lag_bytes": [1, null, 3], "lag_seconds": [0.1, null, 0.3]}],
            "stats": [
                {"node": "<r1>", "policy": "eventual", "reads": 3, "token_waits": 1, "token_wait_seconds": 0.004, "fallbacks": {"wait_timeout": 0}},
                {"node": "primary", "policy": "read_your_writes", "reads": 1, "token_waits": 0, "token_wait_seconds": 0.0, "fallbacks": {"wait_timeout": 1}}
            ],
            "policy": "read_your_writes", "clients": 2, "uptime_seconds": 12.3
        })
    }

    #[test]
    fn renders_every_node_as_a_plain_table_row() {
        let page = render(&status());
        assert!(page.contains(r#"<tr data-node="primary" data-role="primary">"#));
        assert!(
            page.contains(r#"data-node="&lt;r1&gt;" data-role="replica""#),
            "escaped"
        );
        assert!(!page.contains("<r1>"), "names are escaped");
        assert!(page.contains("2.0 KiB") && page.contains("1.50 s") && page.contains("ejected"));
        assert!(
            page.contains("75 % (3)") && page.contains("25 % (1)"),
            "read shares"
        );
        assert!(page.contains(r#"<td>wait_timeout</td><td class="num">1</td>"#));
        assert!(page.contains("1 reads waited") && page.contains("4.0 ms on average"));
        assert!(
            page.contains("<polyline points=\"0.0,"),
            "a sparkline with a gap"
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'"));
        assert!(csp.contains(&format!("'sha256-{}'", hash(SCRIPT))));
        assert!(csp.contains(&format!("'sha256-{}'", hash(STYLE))));
        let page = render(&status());
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
        assert!(page.contains(&format!("<style>{STYLE}</style>")));
        // Nothing is loaded from anywhere: no src attributes, links only to
        // this server's own paths.
        assert!(!page.contains("src="), "no external resources");
        for link in page.split("href=\"").skip(1) {
            assert!(link.starts_with('/'), "a link off the server: {link}");
        }
    }
}
