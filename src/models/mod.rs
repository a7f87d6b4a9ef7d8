//! Forward passes of the SD3 components, built from [`crate::ops`] on a [`crate::graph::Graph`].

pub mod clip;
pub mod controlnet;
pub mod layers;
pub mod mmdit;
pub mod t5;
pub mod vae;

/// Checks tokenized prompts for an encoder: at least one, all the same length,
/// every id inside the vocabulary. Returns (batch, tokens).
pub(crate) fn check_prompts(
    encoder: &str,
    prompts: &[Vec<u32>],
    vocab: usize,
) -> crate::Result<(usize, usize)> {
    let tokens = prompts.first().map(|p| p.len()).unwrap_or(0);
    if prompts.is_empty() || prompts.iter().any(|p| p.len() != tokens) {
        return Err(crate::Error::Graph(format!(
            "{encoder}: prompts must all have the same token count"
        )));
    }
    if let Some(bad) = prompts.iter().flatten().find(|&&i| i as usize >= vocab) {
        return Err(crate::Error::Graph(format!(
            "{encoder}: token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok((prompts.len(), tokens))
}
