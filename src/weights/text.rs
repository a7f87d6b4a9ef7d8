//! Text-encoder checkpoints. CLIP and T5 tensors carry transformers' names in
//! every layout users download; only the prefix differs: none in diffusers
//! folders (`text_encoder/model.safetensors`) and in the separate files
//! (`clip_l.safetensors`, `t5xxl_fp16.safetensors`), and
//! `text_encoders.<name>.transformer.` in Stability's all-in-one files.

use std::path::{Path, PathBuf};

use super::recipe::Recipe;
use super::{Checkpoint, WeightsError};

/// One text encoder's tensors.
pub struct TextSource {
    /// The tensors.
    pub ck: Checkpoint,
    /// Prefix before transformers' names.
    pub prefix: String,
    /// The diffusers `config.json`, when there is one.
    pub config: Option<serde_json::Value>,
    /// Where it came from.
    pub path: PathBuf,
}

impl TextSource {
    /// Opens a diffusers component folder (`model.safetensors`, or shards with an index json).
    pub fn open_folder(dir: &Path) -> Result<TextSource, WeightsError> {
        let ck = Checkpoint::open_diffusers_component(dir, "model")?;
        let config = super::read_config(dir)?;
        Ok(TextSource {
            ck,
            prefix: String::new(),
            config,
            path: dir.to_path_buf(),
        })
    }

    /// Opens a single file: a separate encoder file, or an all-in-one
    /// checkpoint holding `text_encoders.<name>.transformer.*`.
    pub fn open_file(path: &Path, name: &str) -> Result<TextSource, WeightsError> {
        let ck = Checkpoint::open(&[path.to_path_buf()])?;
        let all_in_one = format!("text_encoders.{name}.transformer.");
        let prefix = if ck.with_prefix(&all_in_one).next().is_some() {
            all_in_one
        } else {
            String::new()
        };
        Ok(TextSource {
            ck,
            prefix,
            config: None,
            path: path.to_path_buf(),
        })
    }

    /// Whether the all-in-one file at `path` holds encoder `name`.
    pub fn in_file(path: &Path, name: &str) -> bool {
        Checkpoint::open(&[path.to_path_buf()])
            .map(|ck| {
                ck.with_prefix(&format!("text_encoders.{name}.transformer."))
                    .next()
                    .is_some()
            })
            .unwrap_or(false)
    }

    fn recipe(&self, name: &str) -> Recipe {
        Recipe::Direct(format!("{}{name}", self.prefix))
    }

    /// Whether a tensor is present.
    pub fn has(&self, name: &str) -> bool {
        self.ck.has_recipe(&self.recipe(name))
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        self.ck.recipe_shape(&self.recipe(name))
    }

    /// The shape of a tensor as exactly `N` positive dimensions (`layout`
    /// names them for the error message).
    pub fn dims<const N: usize>(
        &self,
        name: &str,
        layout: &str,
    ) -> Result<[usize; N], WeightsError> {
        self.ck.recipe_dims::<N>(&self.recipe(name), layout)
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        self.ck.read_recipe(&self.recipe(name), expected)
    }

    /// Reads a tensor in the file's packed encoding (see
    /// [`Checkpoint::read_recipe_packed`](super::Checkpoint::read_recipe_packed)).
    pub fn read_packed(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<(crate::DType, Vec<u8>)>, WeightsError> {
        self.ck.read_recipe_packed(&self.recipe(name), expected)
    }

    /// Number of distinct layer indices under `prefix` (e.g. `text_model.encoder.layers.`).
    pub fn count_layers(&self, prefix: &str) -> usize {
        self.ck
            .indices_under(&format!("{}{prefix}", self.prefix))
            .len()
    }

    /// A number from config.json.
    pub fn config_num(&self, key: &str) -> Option<f64> {
        self.config.as_ref()?.get(key)?.as_f64()
    }

    /// A string from config.json.
    pub fn config_str(&self, key: &str) -> Option<String> {
        Some(self.config.as_ref()?.get(key)?.as_str()?.to_string())
    }
}
