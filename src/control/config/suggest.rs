//! The suggestions: an unknown key is answered with the known key it is most likely a typo
//! of ("did you mean"), or with what the place takes.

use toml::de::DeString;
use toml::Spanned;

use super::error::{bad, shown, Bad};

pub(super) fn unknown<I>(key: &Spanned<DeString>, place: &str, known: I, otherwise: &str) -> Bad
where
    I: IntoIterator<Item = &'static str>,
{
    let name = key.get_ref().as_ref();
    let hint = match closest(name, known) {
        Some(k) => format!("did you mean `{k}`?"),
        None => otherwise.to_string(),
    };
    bad(
        key.span(),
        format!("unknown key `{}` {place}; {hint}", shown(name)),
    )
}

/// The known name nearest to `name`, if it is near enough to be a typo of it.
fn closest<I: IntoIterator<Item = &'static str>>(name: &str, known: I) -> Option<&'static str> {
    // No key is this long, and the distance table grows with the name.
    if name.len() > 64 {
        return None;
    }
    let name = name.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (edit_distance(&name, k), k))
        .filter(|&(d, k)| d <= 1 + k.len() / 6)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: Levenshtein plus swapped neighbours, the commonest typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    rows[0] = (0..=b.len()).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("", "host"), 4);
        assert_eq!(closest("hots", ["host", "port"]), Some("host"));
        assert_eq!(closest("url", ["host", "port"]), None);
    }
}
