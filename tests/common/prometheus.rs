//! A strict reader of the Prometheus text exposition format 0.0.4, for tests that scrape
//! `/metrics`: it fails on anything a Prometheus server would reject or misread (a sample
//! before its family's TYPE, a family typed twice, a bad name, label or escape, a repeated
//! series, histogram buckets that shrink or an `+Inf` bucket that is not the count), so a
//! test that passes its output knows a scraper reads it as the test does.

use std::collections::BTreeMap;

/// Every sample of `body`, keyed by its series as written (`name{labels}`), or why `body`
/// is not a valid exposition (with the line number).
pub fn parse(body: &str) -> Result<BTreeMap<String, f64>, String> {
    if !body.is_empty() && !body.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: Option<String> = None;
    let mut current: Option<(String, String)> = None;
    let mut samples = BTreeMap::new();
    // Histogram series without `le`, to their buckets in order, and their counts.
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for (i, line) in body.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            check_name(name).map_err(at)?;
            helped = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("no type".into()))?;
            check_name(name).map_err(at)?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            if helped.as_deref() != Some(name) {
                return Err(at("TYPE without HELP just before it".into()));
            }
            if families.insert(name.into(), kind.into()).is_some() {
                return Err(at(format!("family {name} typed twice")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at("a counter's name must end in _total".into()));
            }
            current = Some((name.into(), kind.into()));
        } else if line.starts_with('#') || line.is_empty() {
            return Err(at("neither HELP, TYPE nor a sample".into()));
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value".into()))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| at(format!("bad value {v}")))?,
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (
                    n,
                    parse_labels(
                        l.strip_suffix('}')
                            .ok_or_else(|| at("unclosed labels".into()))?,
                    )
                    .map_err(at)?,
                ),
                None => (series, Vec::new()),
            };
            check_name(name).map_err(at)?;
            let (family, kind) = current
                .as_ref()
                .ok_or_else(|| at("sample before any TYPE".into()))?;
            let suffix = name.strip_prefix(family.as_str());
            let fits = matches!(
                (kind.as_str(), suffix),
                ("histogram", Some("_bucket" | "_sum" | "_count")) | (_, Some(""))
            );
            if !fits {
                return Err(at(format!("sample of {name} under the TYPE of {family}")));
            }
            if kind == "histogram" {
                let key = |ls: &[(String, String)]| {
                    let rest: Vec<String> = ls
                        .iter()
                        .filter(|(k, _)| k != "le")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("{family}{{{}}}", rest.join(","))
                };
                match suffix {
                    Some("_bucket") => {
                        let le = labels
                            .iter()
                            .find(|(k, _)| k == "le")
                            .ok_or_else(|| at("a bucket without le".into()))?;
                        let le: f64 = match le.1.as_str() {
                            "+Inf" => f64::INFINITY,
                            v => v.parse().map_err(|_| at(format!("bad le {v}")))?,
                        };
                        let seen = buckets.entry(key(&labels)).or_default();
                        if let Some(&(last_le, last)) = seen.last()
                            && (le <= last_le || value < last)
                        {
                            return Err(at("buckets out of order or shrinking".into()));
                        }
                        seen.push((le, value));
                    }
                    Some("_count") => {
                        counts.insert(key(&labels), value);
                    }
                    _ => {}
                }
            }
            if samples.insert(series.to_string(), value).is_some() {
                return Err(at("series repeated".into()));
            }
        }
    }
    for (series, b) in &buckets {
        let inf = b.last().filter(|(le, _)| le.is_infinite()).map(|&(_, v)| v);
        if inf.is_none() || inf != counts.get(series).copied() {
            return Err(format!(
                "{series}: the +Inf bucket is missing or not the count"
            ));
        }
    }
    Ok(samples)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

/// `a="x",b="y\"z"` into its pairs, values unescaped; only `\\`, `\"` and `\n` are escapes.
fn parse_labels(mut s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").ok_or("a label without =\"")?;
        check_name(key)?;
        if key.starts_with("__") || out.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} reserved or repeated"));
        }
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("an unclosed label value")? {
                (_, '\\') => match chars.next().ok_or("a dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("a raw newline in a label value".into()),
                (j, '"') => break j,
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_string(), value));
        s = &rest[end + 1..];
        s = match s.strip_prefix(',') {
            Some(more) if !more.is_empty() => more,
            None if s.is_empty() => s,
            _ => return Err("labels not separated by one comma".into()),
        };
    }
    Ok(out)
}
