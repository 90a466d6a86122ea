//! The `[store]` section the broker and the vault share: sled (the
//! embedded default) or PostgreSQL with its connection settings.

use serde::Deserialize;

/// `[store]` of the broker and the vault: sled in `data_dir` (the default,
/// one machine), or PostgreSQL shared by several replicas
/// (`[store.postgres]`, docs/HA.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// How to reach the service's database; required with `postgres`.
    #[serde(default)]
    pub postgres: Option<crate::PgSettings>,
}

impl PartialEq for StoreConfig {
    fn eq(&self, other: &Self) -> bool {
        let key = |p: &Option<crate::PgSettings>| {
            p.as_ref()
                .map(|p| (p.url.clone(), p.password_file.clone(), p.ca_file.clone()))
        };
        self.backend == other.backend && key(&self.postgres) == key(&other.postgres)
    }
}

impl Eq for StoreConfig {}

/// The store backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled in `data_dir`.
    #[default]
    Sled,
    /// PostgreSQL (`[store.postgres]`).
    Postgres,
}

impl StoreConfig {
    /// The PostgreSQL settings when the backend is PostgreSQL; an error
    /// saying what to set when they are missing or wrong.
    pub fn postgres(&self) -> Result<Option<&crate::PgSettings>, String> {
        match (self.backend, &self.postgres) {
            (StoreBackend::Sled, _) => Ok(None),
            (StoreBackend::Postgres, None) => Err(
                "store.backend = \"postgres\" needs [store.postgres] with url (and \
                 password_file, ca_file): set them in the config file, or with \
                 --store-postgres-url and the flags beside it"
                    .to_owned(),
            ),
            (StoreBackend::Postgres, Some(p)) => {
                crate::connect::check(p).map_err(|e| e.to_string())?;
                Ok(Some(p))
            }
        }
    }
}

impl StoreConfig {
    /// The section's path fields, by their dotted names (made relative to
    /// the config file's directory when the file gave them).
    pub fn paths_mut(&mut self) -> Vec<(&'static str, &mut std::path::PathBuf)> {
        let mut paths = Vec::new();
        if let Some(p) = self.postgres.as_mut() {
            paths.extend(
                p.password_file
                    .as_mut()
                    .map(|f| ("store.postgres.password_file", f)),
            );
            paths.extend(p.ca_file.as_mut().map(|f| ("store.postgres.ca_file", f)));
        }
        paths
    }
}
