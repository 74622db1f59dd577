//! What PostgreSQL cannot store, or cannot give back: the NUL character, in `text` or anywhere
//! in `jsonb`; and JSON numbers so close to the largest double that `jsonb`'s exact decimal
//! form of them no longer reads back as a double (`1.7976931348623157e308` is stored, and every
//! read of the row fails).
//!
//! Input from users is refused with [`find_nul`] and [`find_unreadable_number`] (the caller
//! names the field); output from agents and handlers, which must be stored whatever it holds,
//! has every NUL replaced by [`NUL_MARK`] with [`replace_nul`] and every such number made a
//! string with [`replace_unreadable_numbers`], so the change is visible where it is read.

use serde_json::Value;

/// What a NUL becomes in stored output: U+2400 SYMBOL FOR NULL.
pub const NUL_MARK: char = '\u{2400}';

/// A JSON value's type in words, for errors: "an array", "a number".
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

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

/// The largest magnitude of a JSON number accepted in input and kept as a number in output.
pub const MAX_NUMBER: f64 = 1e300;

fn unreadable(n: &serde_json::Number) -> bool {
    n.as_f64().is_some_and(|f| f.abs() > MAX_NUMBER)
}

/// Where the first number beyond ±[`MAX_NUMBER`] in `v` is (a path as [`find_nul`] gives).
pub fn find_unreadable_number(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => unreadable(n).then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| find_unreadable_number(x).map(|p| format!("[{i}]{p}"))),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, x)| find_unreadable_number(x).map(|p| format!(".{k}{p}"))),
        _ => None,
    }
}

/// Replaces every number beyond ±[`MAX_NUMBER`] in `v` by its text. Returns whether any was.
pub fn replace_unreadable_numbers(v: &mut Value) -> bool {
    match v {
        Value::Number(n) if unreadable(n) => {
            *v = Value::String(n.to_string());
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |acc, x| replace_unreadable_numbers(x) | acc),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |acc, x| replace_unreadable_numbers(x) | acc),
        _ => false,
    }
}

/// `v` made storable: NULs replaced, unreadable numbers made text. Returns whether it changed.
pub fn make_storable(v: &mut Value) -> bool {
    replace_nul(v) | replace_unreadable_numbers(v)
}

/// Whether `v` needs [`make_storable`].
pub fn needs_change(v: &Value) -> bool {
    find_nul(v).is_some() || find_unreadable_number(v).is_some()
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
    fn numbers_jsonb_cannot_give_back_are_found_and_made_text() {
        let mut v: Value =
            serde_json::from_str(r#"{"ok": 1e300, "deep": [1, {"x": -1.7976931348623157e308}]}"#)
                .unwrap();
        assert_eq!(find_unreadable_number(&v), Some(".deep[1].x".into()));
        assert!(make_storable(&mut v));
        assert_eq!(v["deep"][1]["x"], json!("-1.7976931348623157e+308"));
        assert_eq!(v["ok"], json!(1e300));
        assert!(!needs_change(&v));
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
