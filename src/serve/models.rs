//! The models a client may choose, by name only: the model the server started with, the
//! built-in demo models, and the diffusers folders directly inside `--models-dir` (those holding
//! a `model_index.json`). A request never carries a path: a name is looked up in this list,
//! which is made from the folder's own entries, so `../x` or `/etc` name nothing.

use std::path::PathBuf;

use crate::weights::demo::DEMO_MODELS;

/// One model a client can pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// What clients send (`sd_model_checkpoint`) and see (`title`, `model_name`).
    pub name: String,
    /// What [`crate::engine::Engine::open`] is given.
    pub location: String,
}

/// Where models are found.
#[derive(Debug, Clone)]
pub struct Models {
    /// `--model` as given.
    pub startup: String,
    pub models_dir: Option<PathBuf>,
}

impl Models {
    /// The name clients see for `--model`: a built-in or repo id as given, a folder by its last
    /// component.
    pub fn startup_entry(&self) -> ModelEntry {
        let trimmed = self.startup.trim_end_matches('/');
        let name = if std::path::Path::new(trimmed).is_dir() {
            trimmed.rsplit('/').next().unwrap_or(trimmed)
        } else {
            trimmed
        };
        ModelEntry {
            name: name.to_string(),
            location: self.startup.clone(),
        }
    }

    /// Every model, the startup one first, then the demo models, then `--models-dir` sorted by
    /// name; a name seen twice keeps its first entry. Read afresh on each call, so folders added
    /// while the server runs appear.
    pub fn list(&self) -> Vec<ModelEntry> {
        let mut entries = vec![self.startup_entry()];
        entries.extend(DEMO_MODELS.iter().map(|name| ModelEntry {
            name: name.to_string(),
            location: name.to_string(),
        }));
        if let Some(dir) = &self.models_dir {
            let mut found: Vec<ModelEntry> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join("model_index.json").is_file())
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    let location = e.path().to_str()?.to_string();
                    Some(ModelEntry { name, location })
                })
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            entries.extend(found);
        }
        let mut seen = std::collections::HashSet::new();
        entries.retain(|e| seen.insert(e.name.clone()));
        entries
    }

    /// The model called `name` (A1111 clients send the `title`, which is the name here).
    pub fn find(&self, name: &str) -> Option<ModelEntry> {
        self.list().into_iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_reach_outside_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("mine");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("model_index.json"), "{}").unwrap();
        std::fs::create_dir(dir.path().join("not-a-model")).unwrap();
        let models = Models {
            startup: "demo".into(),
            models_dir: Some(dir.path().to_path_buf()),
        };
        let names: Vec<String> = models.list().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["demo", "demo-flawed", "mine"]);
        assert_eq!(models.find("mine").unwrap().location, model.to_str().unwrap());
        for bad in ["not-a-model", "../mine", "mine/", "/etc", "", "."] {
            assert_eq!(models.find(bad), None, "{bad}");
        }
    }
}
