//! The layers of a configuration: built-in defaults, then the YAML file, then the
//! environment, merged as YAML values with the origin of every key remembered, so that an
//! error can say which file or variable to change. Keys the defaults do not have are refused
//! with the closest known key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use super::Error;

/// Environment variables that are not `SECTION__KEY` overrides but are still ours.
const ENV_CONFIG_FILE: &str = "HARNESS_CONFIG";
const ENV_HOME: &str = "HARNESS_HOME";
const ENV_DATABASE_URL: &str = "DATABASE_URL";
const ENV_PREFIX: &str = "HARNESS_";
/// `HARNESS_*` variables that are not settings: the config file, the home, the init switch,
/// and those the harness gives its own agent runs (a harness started by an agent sees them).
const NOT_SETTINGS: [&str; 6] = [
    ENV_CONFIG_FILE,
    ENV_HOME,
    "HARNESS_NO_INIT",
    "HARNESS_INPUT",
    "HARNESS_INPUT_FILE",
    "HARNESS_RESULT_FILE",
];
const DEFAULT_FILE: &str = "harness.yml";

/// Where a setting came from, so an error can point at the line to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "built-in default"),
            Origin::File(p) => write!(f, "in {}", p.display()),
            Origin::Env(v) => write!(f, "from environment variable {v}"),
        }
    }
}

/// Defaults with the file and environment laid over them, and where each value came from.
pub(super) struct Layers {
    defaults: Value,
    merged: Value,
    origins: BTreeMap<String, Origin>,
}

impl Layers {
    pub(super) fn new(defaults: Value) -> Layers {
        Layers {
            merged: defaults.clone(),
            defaults,
            origins: BTreeMap::new(),
        }
    }

    /// Lays the YAML file at `path` over what is there.
    pub(super) fn add_file(&mut self, path: &Path) -> Result<(), Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: Value = serde_norway::from_str(&text).map_err(|e| Error::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        match file {
            Value::Null => Ok(()),
            Value::Mapping(_) => {
                let origin = Origin::File(path.to_path_buf());
                overlay(
                    &mut self.merged,
                    &self.defaults,
                    file,
                    "",
                    &origin,
                    &mut self.origins,
                )
            }
            _ => Err(Error::Syntax {
                path: path.to_path_buf(),
                message: "the top level must be a mapping of sections".into(),
            }),
        }
    }

    /// Lays `HARNESS_<SECTION>__<KEY>`, `DATABASE_URL` and `HARNESS_HOME` over what is there.
    pub(super) fn add_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), Error> {
        for (var, raw) in env {
            let key = if var == ENV_DATABASE_URL {
                "database.url".to_string()
            } else if var == ENV_HOME {
                "home".to_string()
            } else if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                if !rest.contains("__") {
                    if NOT_SETTINGS.contains(&var.as_str()) {
                        continue;
                    }
                    // A setting with one underscore where two belong is silently ignored
                    // nowhere: HARNESS_API_BIND is an error that names HARNESS_API__BIND.
                    let key = rest.to_ascii_lowercase();
                    let meant = (0..key.len())
                        .filter(|i| key.as_bytes()[*i] == b'_')
                        .map(|i| format!("{}.{}", &key[..i], &key[i + 1..]))
                        .find(|k| lookup(&self.defaults, k).is_some());
                    return Err(Error::UnknownKey {
                        key,
                        origin: Origin::Env(var.clone()),
                        hint: match meant {
                            Some(k) => format!(
                                "did you mean `{k}`? Settings take two underscores between \
                                 section and key: HARNESS_{}",
                                k.replace('.', "__").to_ascii_uppercase()
                            ),
                            None => format!(
                                "settings are HARNESS_<SECTION>__<KEY> (two underscores); the \
                                 other variables are {}",
                                NOT_SETTINGS.join(", ")
                            ),
                        },
                    });
                }
                rest.split("__")
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>()
                    .join(".")
            } else {
                continue;
            };
            let origin = Origin::Env(var.clone());
            let default_here = lookup(&self.defaults, &key).ok_or_else(|| Error::UnknownKey {
                key: key.clone(),
                origin: origin.clone(),
                hint: hint_for(&self.defaults, &key),
            })?;
            let value = env_value(raw, default_here);
            set_path(&mut self.merged, &key, value);
            self.origins.insert(key, origin);
        }
        Ok(())
    }

    /// The merged value, to deserialize.
    pub(super) fn merged(&self) -> Value {
        self.merged.clone()
    }

    /// The most specific recorded origin of `key`: `api.tokens[0].scope` came with
    /// `api.tokens`.
    pub(super) fn origin_of(&self, key: &str) -> Origin {
        let mut probe = key.to_string();
        loop {
            if let Some(o) = self.origins.get(&probe) {
                return o.clone();
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe.truncate(i),
                None => return Origin::Default,
            }
        }
    }
}

/// Which file to read, in precedence order.
pub(super) fn choose_file(
    explicit: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env.get(ENV_CONFIG_FILE).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_FILE);
    default.is_file().then_some(default)
}

/// Merges `src` (from a file) into `dst`, rejecting keys that the defaults do not have.
/// Settings that are maps with keys of the user's choosing, set whole by each layer.
const FREE_FORM: &[&str] = &["worker.queues"];

fn overlay(
    dst: &mut Value,
    defaults: &Value,
    src: Value,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) -> Result<(), Error> {
    let Value::Mapping(src) = src else {
        unreachable!("callers pass mappings")
    };
    for (k, v) in src {
        let name = match &k {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let Some(default_here) = lookup(defaults, &key) else {
            return Err(Error::UnknownKey {
                hint: hint_for(defaults, &key),
                key,
                origin: origin.clone(),
            });
        };
        match (default_here, v) {
            // A map whose keys are the user's (queue names): taken whole.
            (_, v) if FREE_FORM.contains(&key.as_str()) => {
                set_path(dst, &key, v);
                origins.insert(key, origin.clone());
            }
            (Value::Mapping(_), Value::Null) => {}
            (Value::Mapping(_), v @ Value::Mapping(_)) => {
                overlay(dst, defaults, v, &key, origin, origins)?;
            }
            (_, v) => {
                set_path(dst, &key, v);
                origins.insert(key, origin.clone());
            }
        }
    }
    Ok(())
}

fn lookup<'a>(root: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(root, |v, part| match v {
        Value::Mapping(m) => m.get(Value::String(part.to_string())),
        _ => None,
    })
}

pub(super) fn set_path(root: &mut Value, dotted: &str, value: Value) {
    let mut cur = root;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !matches!(cur, Value::Mapping(_)) {
            *cur = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(m) = cur else {
            unreachable!()
        };
        let k = Value::String(part.to_string());
        if i + 1 == parts.len() {
            m.insert(k, value);
            return;
        }
        cur = m.entry(k).or_insert(Value::Null);
    }
}

/// "did you mean" and the list of keys allowed where the unknown one was found.
fn hint_for(defaults: &Value, key: &str) -> String {
    let (parent, leaf) = match key.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, key),
    };
    let section = match parent {
        Some(p) => lookup(defaults, p),
        None => Some(defaults),
    };
    let Some(Value::Mapping(m)) = section else {
        return format!("`{}` has no sub-keys", parent.unwrap_or_default());
    };
    let allowed: Vec<String> = m
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let closest = allowed
        .iter()
        .map(|a| (edit_distance(a, leaf), a))
        .filter(|(d, _)| *d <= 3)
        .min();
    let place = parent.map_or("at the top level".to_string(), |p| format!("in `{p}`"));
    match closest {
        Some((_, a)) => format!(
            "did you mean `{}`? allowed {place}: {}",
            parent.map_or(a.clone(), |p| format!("{p}.{a}")),
            allowed.join(", ")
        ),
        None => format!("allowed {place}: {}", allowed.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Environment values are strings; give them the type the default has, so
/// `HARNESS_BULK__MAX_CONCURRENT=4` is a number while a numeric-looking password stays text.
fn env_value(raw: &str, default_here: &Value) -> Value {
    match default_here {
        Value::String(_) | Value::Null => Value::String(raw.to_string()),
        _ => serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
    }
}
