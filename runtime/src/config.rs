//! Service configuration: a TOML file whose every field can be overridden by
//! a flag or environment variable (clap collects those), merged into one
//! table and then checked by serde, so an error names the file and the field.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file or the merged settings are invalid.
    #[error("config {origin}: {message}")]
    Invalid {
        /// The file, or "flags and environment".
        origin: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// Makes the paths a config `file` gave relative to its directory: each of
/// `paths` (dotted field name, value) that is relative and not `given` by a
/// flag or variable (those stay relative to the working directory).
pub fn paths_relative_to_file<'a>(
    file: Option<&Path>,
    given: impl Fn(&str) -> bool,
    paths: impl IntoIterator<Item = (&'a str, &'a mut PathBuf)>,
) {
    let Some(base) = file.map(|f| f.parent().unwrap_or(Path::new("."))) else {
        return;
    };
    for (field, path) in paths {
        if !given(field) && path.is_relative() {
            *path = base.join(&*path);
        }
    }
}

/// Whether `overrides` set `field` (a flag or variable was given).
pub fn overridden(overrides: &[(&str, Option<toml::Value>)], field: &str) -> bool {
    overrides.iter().any(|(k, v)| *k == field && v.is_some())
}

/// Loads `path` (if given) as TOML, applies `overrides` (`("tls.cert",
/// Some(value))`; `None` leaves the file's value), and deserializes.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    overrides: &[(&str, Option<toml::Value>)],
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let origin = path.map_or_else(
        || "from flags and environment".to_owned(),
        |p| p.display().to_string(),
    );
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: e.to_string().trim().replace('\n', " "),
                })?
        }
        None => toml::Table::new(),
    };
    for (key, value) in overrides {
        let Some(value) = value else { continue };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut node = &mut table;
        for part in parts {
            node = node
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: format!("`{part}` must be a table"),
                })?;
        }
        node.insert(last.to_owned(), value.clone());
    }
    T::deserialize(toml::Value::Table(table)).map_err(|e| {
        let mut message = e.to_string().trim().replace('\n', " ");
        if let Some(field) = missing_field(&message) {
            // The override that sets it names its flag and variable; a field
            // without one is set in the file only.
            let key = overrides
                .iter()
                .map(|(k, _)| *k)
                .find(|k| k.rsplit('.').next() == Some(field));
            message.push_str(&match key {
                Some(key) => format!(
                    "; set it in the config file, with --{} or with {env_prefix}{}",
                    key.replace(['.', '_'], "-"),
                    key.replace('.', "_").to_uppercase()
                ),
                None => format!("; set `{field}` in the config file"),
            });
        }
        ConfigError::Invalid { origin, message }
    })
}

/// The field serde's "missing field `x`" message names.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.split("missing field `").nth(1)?;
    rest.split('`').next()
}

/// A string override.
pub fn text(value: &Option<String>) -> Option<toml::Value> {
    value.clone().map(toml::Value::String)
}

/// A path override.
pub fn path(value: &Option<PathBuf>) -> Option<toml::Value> {
    value
        .as_ref()
        .map(|p| toml::Value::String(p.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        tls: Tls,
    }
    #[derive(Debug, serde::Deserialize)]
    struct Tls {
        cert: String,
    }

    #[test]
    fn flags_override_the_file_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"a\"\n[tls]\ncert = \"x\"\n").unwrap();
        let s: Sample = load(
            Some(&file),
            &[("tls.cert", Some(toml::Value::String("y".into())))],
            "T_",
        )
        .unwrap();
        assert_eq!((s.listen.as_str(), s.tls.cert.as_str()), ("a", "y"));

        std::fs::write(&file, "listen = \"a\"\n").unwrap();
        let err = load::<Sample>(Some(&file), &[], "T_")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing field `tls`") && err.contains("c.toml"),
            "{err}"
        );

        // A missing field names the flag and variable that set it.
        std::fs::write(&file, "[tls]\ncert = \"x\"\n").unwrap();
        let err = load::<Sample>(Some(&file), &[("listen", None)], "T_")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen or with T_LISTEN"), "{err}");

        std::fs::write(&file, "listen = \"a\"\nbogus = 1\n[tls]\ncert = \"x\"\n").unwrap();
        let err = load::<Sample>(Some(&file), &[], "T_")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
