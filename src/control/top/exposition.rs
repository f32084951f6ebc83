//! Reading a Prometheus text exposition (the router's own `/metrics`) into samples,
//! and the sums `top` takes over them: a counter across label values, a histogram's
//! buckets, a quantile from the buckets' growth.

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn matches(&self, name: &str, filter: &[(&str, &str)]) -> bool {
        self.name == name
            && filter
                .iter()
                .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of an exposition; lines that do not parse are skipped (a newer router
/// may write what this one does not know).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of every sample called `name` whose labels include `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.matches(name, filter))
        .map(|s| s.value)
        .sum()
}

/// A histogram's cumulative buckets, summed over the series matching `filter`, by
/// bound in rising order (`+Inf` last).
pub fn buckets(samples: &[Sample], histogram: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let name = format!("{histogram}_bucket");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in samples.iter().filter(|s| s.matches(&name, filter)) {
        let Some(le) = s.label("le").and_then(|le| match le {
            "+Inf" => Some(f64::INFINITY),
            le => le.parse().ok(),
        }) else {
            continue;
        };
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some((_, count)) => *count += s.value,
            None => out.push((le, s.value)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The growth of cumulative buckets from `before` to `after` (a bound missing before
/// counts from 0).
pub fn growth(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, (n - was).max(0.0))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated inside its bucket as
/// Prometheus' `histogram_quantile` does; None without observations. One in the
/// `+Inf` bucket reads as the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP x_seconds x
# TYPE x_seconds histogram
x_seconds_bucket{backend="a",model="m",le="0.1"} 1
x_seconds_bucket{backend="a",model="m",le="0.5"} 3
x_seconds_bucket{backend="a",model="m",le="+Inf"} 4
x_seconds_bucket{backend="b \"q\"",model="m",le="0.1"} 1
x_seconds_bucket{backend="b \"q\"",model="m",le="0.5"} 1
x_seconds_bucket{backend="b \"q\"",model="m",le="+Inf"} 1
up 1
garbage{
"#;

    #[test]
    fn samples_parse_with_escaped_labels_and_sum_by_filter() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 7);
        assert_eq!(s[3].label("backend"), Some("b \"q\""));
        assert_eq!(sum(&s, "up", &[]), 1.0);
        assert_eq!(sum(&s, "x_seconds_bucket", &[("le", "+Inf")]), 5.0);
        assert_eq!(
            buckets(&s, "x_seconds", &[]),
            [(0.1, 2.0), (0.5, 4.0), (f64::INFINITY, 5.0)]
        );
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let b = [(0.1, 2.0), (0.5, 4.0), (f64::INFINITY, 4.0)];
        assert_eq!(quantile(0.5, &b), Some(0.1));
        let q75 = quantile(0.75, &b).expect("a quantile");
        assert!((q75 - 0.3).abs() < 1e-9, "{q75}");
        assert_eq!(
            quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 2.0)]),
            Some(1.0)
        );
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        let before = [(0.1, 2.0), (0.5, 3.0)];
        assert_eq!(
            growth(&b, &before),
            [(0.1, 0.0), (0.5, 1.0), (f64::INFINITY, 4.0)]
        );
    }
}
