//! The prompt tokenizers: CLIP BPE (from `tokenizer.json`, or from
//! `vocab.json` + `merges.txt` + `tokenizer_config.json` as many diffusers
//! folders ship it) and T5's SentencePiece unigram (`tokenizer.json`).
//!
//! Special tokens are read from the folder's configs, never assumed: the two
//! CLIP tokenizers of SD3 pad differently, and CLIP-G registers its pad token
//! "!" as a special token, which splits every "!" out of the text before BPE.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{
    unicode::NFC, utils::Lowercase, NormalizerWrapper, Replace, Sequence as NormSeq,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// CLIP's context length.
pub const CLIP_TOKENS: usize = 77;

/// The pre-tokenizer pattern of CLIP (as transformers builds it).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| tok_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| tok_err(path, e))
}

/// A token named in a config: either a string or `{"content": …}`.
fn token_str(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v.get("content")?.as_str().map(str::to_string))
}

/// The id of the special token the config names `name` (or `default`).
fn special_id(
    t: &Tokenizer,
    dir: &Path,
    config: Option<&serde_json::Value>,
    name: &str,
    default: &str,
) -> Result<u32> {
    let tok = config
        .and_then(|c| token_str(&c[name]))
        .unwrap_or(default.to_string());
    t.token_to_id(&tok).ok_or_else(|| {
        Error::Io(format!(
            "{}: {name} '{tok}' is not in the vocabulary",
            dir.display()
        ))
    })
}

/// A prompt's token ids, padded to the tokenizer's length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `length` ids.
    pub ids: Vec<u32>,
    /// Tokens of the prompt that did not fit and were dropped.
    pub dropped: usize,
}

/// A tokenizer with its special ids and fixed output length.
pub struct PromptTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
    /// Output length (77 for CLIP, 256 by default for T5).
    pub length: usize,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl PromptTokenizer {
    /// Loads a CLIP tokenizer folder (tokenizer.json, or vocab.json + merges.txt).
    pub fn clip(dir: &Path) -> Result<PromptTokenizer> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let json = dir.join("tokenizer.json");
        let mut inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            for p in [&vocab, &merges] {
                if !p.exists() {
                    return Err(Error::Io(format!(
                        "{}: missing (a CLIP tokenizer needs tokenizer.json, or vocab.json and merges.txt)",
                        p.display()
                    )));
                }
            }
            let unk = config
                .as_ref()
                .and_then(|c| token_str(&c["unk_token"]))
                .unwrap_or("<|endoftext|>".into());
            let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                .end_of_word_suffix("</w>".into())
                .unk_token(unk)
                .build()
                .map_err(|e| tok_err(&vocab, e))?;
            let mut t = Tokenizer::new(bpe);
            let ws = Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| tok_err(&vocab, e))?;
            let norms: Vec<NormalizerWrapper> = vec![NFC.into(), ws.into(), Lowercase.into()];
            t.with_normalizer(Some(NormSeq::new(norms)));
            let split = Split::new(
                SplitPattern::Regex(CLIP_SPLIT.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(|e| tok_err(&vocab, e))?;
            let pre: Vec<PreTokenizerWrapper> =
                vec![split.into(), ByteLevel::new(false, true, false).into()];
            t.with_pre_tokenizer(Some(PreSeq::new(pre)));
            t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            // Registered tokens (CLIP-G's "!" pad among them) are matched before BPE.
            if let Some(added) = config
                .as_ref()
                .and_then(|c| c.get("added_tokens_decoder"))
                .and_then(|a| a.as_object())
            {
                let toks: Vec<AddedToken> = added
                    .values()
                    .filter_map(|v| {
                        let content = v.get("content")?.as_str()?.to_string();
                        let special = v.get("special").and_then(|s| s.as_bool()).unwrap_or(true);
                        Some(AddedToken::from(content, special))
                    })
                    .collect();
                t.add_special_tokens(&toks);
            }
            t
        };
        Self::finish(&mut inner, dir, CLIP_TOKENS)?;
        let get =
            |name: &str, default: &str| special_id(&inner, dir, config.as_ref(), name, default);
        let bos = get("bos_token", "<|startoftext|>")?;
        let eos = get("eos_token", "<|endoftext|>")?;
        let pad = get("pad_token", "<|endoftext|>")?;
        Ok(PromptTokenizer {
            inner,
            bos: Some(bos),
            eos,
            pad,
            length: CLIP_TOKENS,
            path: dir.to_path_buf(),
        })
    }

    /// Loads a T5 tokenizer folder (tokenizer.json); `length` tokens per prompt.
    pub fn t5(dir: &Path, length: usize) -> Result<PromptTokenizer> {
        let json = dir.join("tokenizer.json");
        if !json.exists() {
            return Err(Error::Io(format!(
                "{}: missing (the T5 tokenizer needs tokenizer.json)",
                json.display()
            )));
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let mut inner = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
        Self::finish(&mut inner, dir, length)?;
        let get =
            |name: &str, default: &str| special_id(&inner, dir, config.as_ref(), name, default);
        let eos = get("eos_token", "</s>")?;
        let pad = get("pad_token", "<pad>")?;
        Ok(PromptTokenizer {
            inner,
            bos: None,
            eos,
            pad,
            length,
            path: dir.to_path_buf(),
        })
    }

    fn finish(t: &mut Tokenizer, dir: &Path, length: usize) -> Result<()> {
        // We add special tokens, truncate and pad ourselves.
        t.with_truncation(None).map_err(|e| tok_err(dir, e))?;
        t.with_padding(None);
        if length < 2 {
            return Err(Error::Io(format!(
                "{}: a length of {length} tokens leaves no room for the prompt",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Tokenizes `prompt`: [BOS] + tokens + EOS, truncated to `length`, padded.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self.inner.encode(prompt, false).map_err(|e| {
            Error::Io(format!(
                "{}: cannot tokenize {prompt:?}: {e}",
                self.path.display()
            ))
        })?;
        let content = enc.get_ids();
        let room = self.length - 1 - self.bos.is_some() as usize;
        let kept = content.len().min(room);
        let mut ids = Vec::with_capacity(self.length);
        ids.extend(self.bos);
        ids.extend_from_slice(&content[..kept]);
        ids.push(self.eos);
        ids.resize(self.length, self.pad);
        Ok(Tokens {
            ids,
            dropped: content.len() - kept,
        })
    }

    /// The end-of-text id.
    pub fn eos(&self) -> u32 {
        self.eos
    }
}
