//! What PostgreSQL cannot store: the NUL character, in `text` or anywhere in `jsonb`.
//!
//! Input from users is refused with [`find_nul`] (the caller names the field); output from
//! agents and handlers, which must be stored whatever it holds, has every NUL replaced by
//! [`NUL_MARK`] with [`replace_nul`], so the change is visible where the output is read.

use serde_json::Value;

/// What a NUL becomes in stored output: U+2400 SYMBOL FOR NULL.
pub const NUL_MARK: char = '\u{2400}';

/// Whether `s` holds a NUL.
pub fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

/// Where the first NUL of `v` is, as a path like `.a[2].b` (`""` for `v` itself, and the key
/// named when the NUL is in a key), or `None` when there is none.
pub fn find_nul(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => has_nul(s).then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| find_nul(x).map(|p| format!("[{i}]{p}"))),
        Value::Object(map) => map.iter().find_map(|(k, x)| {
            if has_nul(k) {
                Some(format!(".{}", k.replace('\0', "\\u0000")))
            } else {
                find_nul(x).map(|p| format!(".{k}{p}"))
            }
        }),
        _ => None,
    }
}

/// `s` with every NUL replaced by [`NUL_MARK`].
pub fn replace_nul_str(s: &str) -> String {
    s.replace('\0', &NUL_MARK.to_string())
}

/// Replaces every NUL in `v` (strings and keys) by [`NUL_MARK`]. Returns whether any was found.
pub fn replace_nul(v: &mut Value) -> bool {
    match v {
        Value::String(s) if has_nul(s) => {
            *s = replace_nul_str(s);
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, x| replace_nul(x) | acc),
        Value::Object(map) => {
            if map.keys().any(|k| has_nul(k)) {
                let old = std::mem::take(map);
                for (k, mut x) in old {
                    replace_nul(&mut x);
                    map.insert(replace_nul_str(&k), x);
                }
                true
            } else {
                map.values_mut().fold(false, |acc, x| replace_nul(x) | acc)
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_path_of_the_first_nul() {
        assert_eq!(
            find_nul(&json!({"a": [1, {"b": "x\u{0}"}]})),
            Some(".a[1].b".into())
        );
        assert_eq!(find_nul(&json!({"k\u{0}": 1})), Some(".k\\u0000".into()));
        assert_eq!(find_nul(&json!("\u{0}")), Some(String::new()));
        assert_eq!(find_nul(&json!({"a": "fine", "n": null})), None);
    }

    #[test]
    fn replaces_nul_in_strings_and_keys_visibly() {
        let mut v = json!({"s": "a\u{0}b", "k\u{0}": ["\u{0}", 1], "n": {"m": "\u{0}\u{0}"}});
        assert!(replace_nul(&mut v));
        assert_eq!(
            v,
            json!({"s": "a\u{2400}b", "k\u{2400}": ["\u{2400}", 1], "n": {"m": "\u{2400}\u{2400}"}})
        );
        assert_eq!(find_nul(&v), None);
        let mut clean = json!({"a": ["b"]});
        assert!(!replace_nul(&mut clean));
    }
}
