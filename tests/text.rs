//! Tokenizers and text encoders against transformers / diffusers fixtures.

mod common;

use std::path::PathBuf;

use sd3_wgpu::tokenize::PromptTokenizer;
use sd3_wgpu::weights::Checkpoint;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(rel)
}

fn prompts() -> (Vec<String>, Vec<usize>, usize) {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("prompts.json")).unwrap()).unwrap();
    let p = j["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let e = j["embed_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    (p, e, j["t5_tokens"].as_u64().unwrap() as usize)
}

/// An i32 tensor of the io fixture as rows.
fn id_rows(name: &str) -> Vec<Vec<u32>> {
    let ck = Checkpoint::open(&[fixture("text_io.safetensors")]).unwrap();
    let e = &ck.tensors[name];
    let flat: Vec<u32> = ck
        .bytes(e)
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
        .collect();
    flat.chunks(e.shape[1]).map(|r| r.to_vec()).collect()
}

#[test]
fn token_ids_match_transformers_for_tricky_prompts() {
    let (prompts, _, t5_len) = prompts();
    let cases = [
        (
            "ids.clip_l",
            PromptTokenizer::clip(&fixture("tokenizer")).unwrap(),
        ),
        (
            "ids.clip_g",
            PromptTokenizer::clip(&fixture("tokenizer_2")).unwrap(),
        ),
        (
            "ids.t5",
            PromptTokenizer::t5(&fixture("tokenizer_3"), t5_len).unwrap(),
        ),
    ];
    for (name, tok) in cases {
        let want = id_rows(name);
        for (p, w) in prompts.iter().zip(&want) {
            let got = tok.encode(p).unwrap();
            assert_eq!(&got.ids, w, "{name}: {p:?}");
        }
        let long = tok.encode(prompts.last().unwrap()).unwrap();
        assert!(
            long.dropped > 0,
            "{name}: the long prompt must report dropped tokens"
        );
        assert_eq!(tok.encode("a cat").unwrap().dropped, 0);
    }
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = std::env::temp_dir().join(format!("sd3-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tokenizer_2/vocab.json"), dir.join("vocab.json")).unwrap();
    let e = PromptTokenizer::clip(&dir).err().unwrap().to_string();
    assert!(e.contains("merges.txt") && e.contains("missing"), "{e}");
    let e = PromptTokenizer::t5(&dir, 32).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
