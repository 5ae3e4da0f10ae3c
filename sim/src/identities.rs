//! The identities file: agent ids and secrets by simulated-agent index, so a rerun
//! authenticates as the same agents instead of enrolling new ones.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) agent_id: String,
    pub(crate) secret: String,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    index: usize,
    agent_id: String,
    secret: String,
}

#[derive(Serialize, Deserialize)]
struct File {
    agents: Vec<Entry>,
}

pub(crate) struct Identities {
    path: Option<PathBuf>,
    table: Mutex<Vec<Option<Identity>>>,
    dirty: AtomicBool,
}

impl Identities {
    /// Reads `path` if it exists; entries beyond `agents` are kept for later runs.
    pub(crate) fn load(path: Option<&Path>, agents: usize) -> anyhow::Result<Identities> {
        let mut table = vec![None; agents];
        if let Some(path) = path
            && path.exists()
        {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("while reading {}", path.display()))?;
            let file: File = serde_json::from_str(&text)
                .with_context(|| format!("while parsing {}", path.display()))?;
            for entry in file.agents {
                if entry.index >= table.len() {
                    table.resize(entry.index + 1, None);
                }
                table[entry.index] = Some(Identity {
                    agent_id: entry.agent_id,
                    secret: entry.secret,
                });
            }
        }
        Ok(Identities {
            path: path.map(Path::to_owned),
            table: Mutex::new(table),
            dirty: AtomicBool::new(false),
        })
    }

    pub(crate) fn get(&self, index: usize) -> Option<Identity> {
        self.lock().get(index).cloned().flatten()
    }

    pub(crate) fn set(&self, index: usize, identity: Identity) {
        let mut table = self.lock();
        if index >= table.len() {
            table.resize(index + 1, None);
        }
        table[index] = Some(identity);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the file if anything changed, by temp file and rename so a killed run
    /// never leaves a truncated file behind.
    pub(crate) fn save(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let agents = self
            .lock()
            .iter()
            .enumerate()
            .filter_map(|(index, identity)| {
                identity.as_ref().map(|identity| Entry {
                    index,
                    agent_id: identity.agent_id.clone(),
                    secret: identity.secret.clone(),
                })
            })
            .collect();
        let text = serde_json::to_string(&File { agents })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("while writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("while renaming {} into place", tmp.display()))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Identity>>> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_identities_load_back_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.json");
        let ids = Identities::load(Some(&path), 3).unwrap();
        let identity = Identity {
            agent_id: "a-2".into(),
            secret: "s-2".into(),
        };
        ids.set(2, identity.clone());
        ids.save().unwrap();

        let again = Identities::load(Some(&path), 3).unwrap();
        assert_eq!(again.get(0), None);
        assert_eq!(again.get(2), Some(identity));
    }

    #[test]
    fn a_smaller_run_keeps_the_identities_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.json");
        let ids = Identities::load(Some(&path), 5).unwrap();
        ids.set(
            4,
            Identity {
                agent_id: "a-4".into(),
                secret: "s-4".into(),
            },
        );
        ids.save().unwrap();

        let small = Identities::load(Some(&path), 2).unwrap();
        small.set(
            0,
            Identity {
                agent_id: "a-0".into(),
                secret: "s-0".into(),
            },
        );
        small.save().unwrap();
        let all = Identities::load(Some(&path), 5).unwrap();
        assert!(all.get(0).is_some() && all.get(4).is_some());
    }
}
