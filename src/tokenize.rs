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
    crate::files::read_json(path)
}

/// A `tokenizer.json`, read with a size bound (never from a FIFO or device).
fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let bytes = crate::files::read_bounded(path, crate::files::MAX_TEXT_BYTES)?;
    Tokenizer::from_bytes(bytes).map_err(|e| tok_err(path, e))
}

/// A BPE `vocab.json` (token → id) and `merges.txt` (one "a b" pair per line,
/// after an optional `#version` line), as transformers reads them.
fn read_vocab_merges(
    vocab: &Path,
    merges: &Path,
) -> Result<(
    tokenizers::models::bpe::Vocab,
    tokenizers::models::bpe::Merges,
)> {
    let json = read_json(vocab)?;
    let map = json
        .as_object()
        .ok_or_else(|| tok_err(vocab, "not a JSON object of token → id"))?;
    let v = map
        .iter()
        .map(|(tok, id)| {
            id.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .map(|id| (tok.clone(), id))
                .ok_or_else(|| {
                    tok_err(
                        vocab,
                        format!("the id of {tok:?} is not a 32-bit whole number"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let text = crate::files::read_text(merges)?;
    let mut m = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => m.push((a.to_string(), b.to_string())),
            _ => {
                return Err(tok_err(
                    merges,
                    format!("line {}: expected two tokens separated by a space", i + 1),
                ))
            }
        }
    }
    Ok((v, m))
}

thread_local! {
    /// Set while [`contained`] runs third-party code on this thread.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The message of a panic caught there.
    static CAUGHT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs tokenizer-crate code, turning a panic inside it into an error. The
/// `tokenizers` crate panics on some malformed files (e.g. a bad
/// `Precompiled` normalizer in a T5 tokenizer.json) instead of returning an
/// error; a user's file must never crash us, so such a panic is caught here
/// and reported as "cannot read", without the panic message on stderr.
fn contained<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINING.with(|c| c.get()) {
                let p = info.payload();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                CAUGHT.with(|m| *m.borrow_mut() = Some(msg));
            } else {
                previous(info);
            }
        }));
    });
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.map_err(|_| {
        let msg = CAUGHT.with(|m| m.borrow_mut().take()).unwrap_or_default();
        tok_err(
            path,
            format!("{what} failed: the tokenizer files are malformed ({msg})"),
        )
    })
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
        contained(dir, "loading the tokenizer", || Self::clip_inner(dir))?
    }

    fn clip_inner(dir: &Path) -> Result<PromptTokenizer> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let json = dir.join("tokenizer.json");
        let mut inner = if json.exists() {
            read_tokenizer(&json)?
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
            let (v, m) = read_vocab_merges(&vocab, &merges)?;
            let bpe = BPE::builder()
                .vocab_and_merges(v, m)
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
        contained(dir, "loading the tokenizer", || Self::t5_inner(dir, length))?
    }

    fn t5_inner(dir: &Path, length: usize) -> Result<PromptTokenizer> {
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
        let mut inner = read_tokenizer(&json)?;
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
        if length < 1 {
            return Err(Error::Io(format!(
                "{}: a length of {length} tokens leaves no room for the prompt",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Tokenizes `prompt`: [BOS] + tokens + EOS, truncated to `length`, padded.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = contained(&self.path, "tokenizing", || {
            self.inner.encode(prompt, false)
        })?
        .map_err(|e| {
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
