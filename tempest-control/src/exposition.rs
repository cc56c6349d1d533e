//! The Prometheus text exposition format: the one parser of the workspace.
//!
//! Every topology process serves its metrics in this format; an agent sums
//! its processes' expositions into its own `/metrics`, and the director
//! scrapes the agents' and turns them into figures. Both read them with
//! [`parse`], which refuses a malformed exposition whole, naming the line,
//! rather than keeping half of it.
//!
//! What is read: `# HELP` and `# TYPE` lines (other comments are skipped),
//! and samples `name{label="value",...} value [timestamp]`, with `\\`, `\"`
//! and `\n` escapes in label values. A sample belongs to the family its
//! name declares, or to the declared family it is a `_bucket`, `_sum`,
//! `_count`, `_total`, `_created` or `_info` of. Integers are kept exact.

use std::collections::{HashMap, HashSet};

/// A sample's value as written: integers are kept exact, so sums of
/// counters do not lose counts.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Number {
    /// An integer.
    Int(i128),
    /// Anything else (`+Inf`, `-Inf` and `NaN` included).
    Float(f64),
}

impl Number {
    /// Parses a value.
    pub fn parse(s: &str) -> Option<Number> {
        if let Ok(i) = s.parse::<i128>() {
            return Some(Number::Int(i));
        }
        match s {
            "+Inf" | "Inf" => Some(Number::Float(f64::INFINITY)),
            "-Inf" => Some(Number::Float(f64::NEG_INFINITY)),
            "NaN" => Some(Number::Float(f64::NAN)),
            _ => s.parse::<f64>().ok().map(Number::Float),
        }
    }

    /// The value as a float.
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// The value as the format writes it.
    pub fn render(self) -> String {
        match self {
            Number::Int(i) => i.to_string(),
            Number::Float(f) if f.is_nan() => "NaN".into(),
            Number::Float(f) if f.is_infinite() => if f > 0.0 { "+Inf" } else { "-Inf" }.into(),
            Number::Float(f) => format!("{f}"),
        }
    }
}

impl std::ops::Add for Number {
    type Output = Number;

    /// The sum, exact while both are integers that do not overflow.
    fn add(self, other: Number) -> Number {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => match a.checked_add(b) {
                Some(s) => Number::Int(s),
                None => Number::Float(a as f64 + b as f64),
            },
            (a, b) => Number::Float(a.as_f64() + b.as_f64()),
        }
    }
}

/// One sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its name as exposed (with `_total`, `_bucket`, ...).
    pub name: String,
    /// Its labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: Number,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A metric family: its `# HELP`, `# TYPE` and samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// Its name.
    pub name: String,
    /// Its `# HELP` text.
    pub help: Option<String>,
    /// Its `# TYPE` (`counter`, `gauge`, `histogram`, ...).
    pub kind: Option<String>,
    /// Its samples, in the order written.
    pub samples: Vec<Sample>,
}

/// Why an exposition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The line at fault (1-based).
    pub line: usize,
    /// What is wrong, with the line's start.
    pub message: String,
}

/// Parses an exposition into its families, in the order first seen.
pub fn parse(text: &str) -> Result<Vec<Family>, ParseError> {
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Families declared by a TYPE or HELP line.
    let mut declared: HashSet<String> = HashSet::new();
    let mut family = |name: &str, families: &mut Vec<Family>| -> usize {
        *index.entry(name.to_owned()).or_insert_with(|| {
            families.push(Family {
                name: name.to_owned(),
                help: None,
                kind: None,
                samples: Vec::new(),
            });
            families.len() - 1
        })
    };
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| {
            let shown: String = line.trim().chars().take(120).collect();
            ParseError {
                line: n + 1,
                message: format!("{why}: {shown}"),
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, value) = rest
                .trim_start()
                .split_once(' ')
                .unwrap_or((rest.trim(), ""));
            match word {
                "HELP" | "TYPE" if is_name(name) => {
                    let i = family(name, &mut families);
                    let slot = if word == "HELP" {
                        &mut families[i].help
                    } else {
                        &mut families[i].kind
                    };
                    if slot.is_none() {
                        *slot = Some(value.trim().to_owned());
                    }
                    declared.insert(name.to_owned());
                }
                "HELP" | "TYPE" => return Err(bad("bad metric name")),
                _ => {} // a comment
            }
            continue;
        }
        let (name, labels, rest) = match line.find(['{', ' ', '\t']) {
            Some(i) if line.as_bytes()[i] == b'{' => {
                let (labels, used) = parse_labels(&line[i + 1..]).map_err(|e| bad(&e))?;
                (&line[..i], labels, &line[i + 1 + used..])
            }
            Some(i) => (&line[..i], Vec::new(), &line[i..]),
            None => return Err(bad("a sample without a value")),
        };
        if !is_name(name) {
            return Err(bad("bad metric name"));
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(Number::parse)
            .ok_or_else(|| bad("bad value"))?;
        let i = family(family_of(name, &declared), &mut families);
        families[i].samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(families)
}

/// Every sample of an exposition, families flattened.
pub fn samples(text: &str) -> Result<Vec<Sample>, ParseError> {
    Ok(parse(text)?.into_iter().flat_map(|f| f.samples).collect())
}

/// A label value escaped for the format.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The family a sample named `sample` belongs to, given the declared ones.
fn family_of<'a>(sample: &'a str, declared: &HashSet<String>) -> &'a str {
    if declared.contains(sample) {
        return sample;
    }
    for suffix in ["_bucket", "_sum", "_count", "_total", "_created", "_info"] {
        if let Some(stem) = sample.strip_suffix(suffix) {
            if declared.contains(stem) {
                return stem;
            }
        }
    }
    sample
}

/// Parses `k="v",...}`; returns the pairs and the bytes used (the `}`
/// included).
fn parse_labels(s: &str) -> Result<(Vec<(String, String)>, usize), String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            return Err("unterminated labels".into());
        }
        if bytes[i] == b'}' {
            return Ok((out, i + 1));
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' {
            i += 1;
        }
        let key = s[start..i].trim();
        if !is_name(key) {
            return Err(format!("bad label name `{key}`"));
        }
        i += 1;
        if bytes.get(i) != Some(&b'"') {
            return Err(format!("label `{key}` has no quoted value"));
        }
        i += 1;
        let mut value = String::new();
        loop {
            match s[i..].chars().next() {
                None => return Err("unterminated label value".into()),
                Some('"') => {
                    i += 1;
                    break;
                }
                Some('\\') => {
                    let next = s[i + 1..].chars().next().ok_or("unterminated escape")?;
                    value.push(match next {
                        'n' => '\n',
                        c => c,
                    });
                    i += 1 + next.len_utf8();
                }
                Some(c) => {
                    value.push(c);
                    i += c.len_utf8();
                }
            }
        }
        out.push((key.to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escapes() {
        let text = "# HELP m_seconds Latency.\n# TYPE m_seconds histogram\n\
                    m_seconds_bucket{a=\"x\\\"y\",le=\"+Inf\"} 3\nm_seconds_sum 1.5\n\
                    # a comment\nother{b=\"line\\nbreak\"} -Inf 1700000000\nbare 7\n";
        let f = parse(text).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].name, "m_seconds");
        assert_eq!(f[0].kind.as_deref(), Some("histogram"));
        assert_eq!(f[0].help.as_deref(), Some("Latency."));
        assert_eq!(f[0].samples.len(), 2);
        assert_eq!(f[0].samples[0].label("a"), Some("x\"y"));
        assert_eq!(f[0].samples[0].value, Number::Int(3));
        assert_eq!(f[0].samples[1].value, Number::Float(1.5));
        assert_eq!(f[1].samples[0].label("b"), Some("line\nbreak"));
        assert_eq!(f[1].samples[0].value.as_f64(), f64::NEG_INFINITY);
        assert_eq!(samples(text).unwrap().len(), 4);
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn malformed_expositions_are_refused_with_the_line() {
        for (text, line) in [
            ("ok 1\nm{a=\"1\" 2\n", 2),
            ("m{a=1} 2\n", 1),
            ("m{} x\n", 1),
            ("1bad 2\n", 1),
            ("m\n", 1),
            ("# TYPE 1x counter\n", 1),
            ("m{a=\"\\", 1),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }

    #[test]
    fn integers_add_exactly() {
        let big = Number::Int(1 << 62);
        assert_eq!(big + Number::Int(1), Number::Int((1 << 62) + 1));
        assert_eq!(Number::Int(1) + Number::Float(0.5), Number::Float(1.5));
        assert_eq!(
            Number::Int(i128::MAX) + Number::Int(1),
            Number::Float(i128::MAX as f64 + 1.0)
        );
        assert_eq!(Number::parse("+Inf").unwrap().render(), "+Inf");
        assert_eq!(Number::parse("NaN").unwrap().render(), "NaN");
        assert!(Number::parse("x").is_none());
    }
}
