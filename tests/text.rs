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
        .unwrap()
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

/// The tokenizers the binary carries (CLIP-L, CLIP-G, T5 v1.1) give
/// transformers' ids for every fixture prompt: scripts, emoji, "!" (CLIP-G's
/// pad, split out as a special token), truncation.
#[test]
fn builtin_tokenizers_match_transformers() {
    let ck = Checkpoint::open(&[fixture("builtin_ids.safetensors")]).unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("prompts.json")).unwrap()).unwrap();
    let prompts: Vec<String> = text["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    for (key, tok) in [
        ("clip_l", PromptTokenizer::builtin_clip_l().unwrap()),
        ("clip_g", PromptTokenizer::builtin_clip_g().unwrap()),
        ("t5", PromptTokenizer::builtin_t5(32).unwrap()),
    ] {
        let (shape, ids) = ck.read_f32(key).unwrap();
        assert_eq!(shape[0], prompts.len());
        for (p, row) in prompts.iter().zip(ids.chunks(shape[1])) {
            let want: Vec<u32> = row.iter().map(|&v| v as u32).collect();
            assert_eq!(tok.encode(p).unwrap().ids, want, "{key}: {p:?}");
        }
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

mod encoders {
    use super::*;
    use sd3_wgpu::models::t5::relative_position_bucket;
    use sd3_wgpu::text::{encode_prompts, TextPaths};
    use sd3_wgpu::DType;

    fn io(name: &str) -> (Vec<usize>, Vec<f64>) {
        let ck = Checkpoint::open(&[fixture("text_io.safetensors")]).unwrap();
        let (s, v) = ck.read_f32(name).unwrap();
        (s, v.iter().map(|&x| x as f64).collect())
    }

    fn paths() -> TextPaths {
        TextPaths::from_folder(&fixture("")).unwrap()
    }

    #[test]
    fn relative_position_buckets_match_transformers() {
        let ck = Checkpoint::open(&[fixture("text_io.safetensors")]).unwrap();
        let e = &ck.tensors["t5.buckets"];
        let want: Vec<i32> = ck
            .bytes(e)
            .unwrap()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for (i, w) in want.iter().enumerate() {
            let rel = i as i64 - 300;
            assert_eq!(
                relative_position_bucket(rel, 32, 128) as i32,
                *w,
                "relative position {rel}"
            );
        }
    }

    fn check(with_t5: bool) {
        check_on(common::gpu(), DType::F32, with_t5, 1e-4);
    }

    /// `gpu`'s activations, `matrix` storage, `bound` on both outputs.
    fn check_on(gpu: &sd3_wgpu::Gpu, matrix: DType, with_t5: bool, bound: f64) {
        let (all, sel, t5_len) = prompts();
        let prompts: Vec<String> = sel.iter().map(|&i| all[i].clone()).collect();
        let mut p = paths();
        if !with_t5 {
            p.t5 = None;
            p.tokenizer_t5 = None;
        }
        let key = if with_t5 { "t5" } else { "no_t5" };
        let (cs, want_ctx) = io(&format!("{key}.prompt_embeds"));
        let (_, want_pooled) = io(&format!("{key}.pooled"));
        let got = encode_prompts(gpu, &p, &prompts, t5_len, cs[2], matrix).unwrap();
        assert_eq!((got.batch, got.tokens, got.width), (cs[0], cs[1], cs[2]));
        let e = common::rel_err(&got.context, &want_ctx);
        eprintln!("{key} {:?}: context rel err {e:.2e}", gpu.activation);
        assert!(e <= bound, "{key} context: relative error {e:.3e}");
        let e = common::rel_err(&got.pooled, &want_pooled);
        eprintln!("{key} {:?}: pooled rel err {e:.2e}", gpu.activation);
        assert!(e <= bound, "{key} pooled: relative error {e:.3e}");
        assert!(
            got.truncated
                .iter()
                .any(|t| t.encoder == "clip_l" && t.prompt == 2),
            "{:?}",
            got.truncated
        );
    }

    #[test]
    fn embeddings_match_encode_prompt_with_t5() {
        check(true);
    }

    /// `--dtype f16`: f16 matrices and activations (T5's residual stream f32).
    #[test]
    fn embeddings_with_f16_activations_stay_within_bound() {
        let Some(gpu) = common::f16_gpu() else {
            eprintln!("skipped: the adapter has no SHADER_F16");
            return;
        };
        for with_t5 in [true, false] {
            check_on(gpu, DType::F16, with_t5, F16_TEXT_BOUND);
        }
    }

    /// Measured on lavapipe: context 8.1e-4 with T5, 5.2e-4 without; pooled 4.5e-4.
    const F16_TEXT_BOUND: f64 = 3e-3;

    #[test]
    fn embeddings_match_encode_prompt_without_t5() {
        check(false);
    }

    #[test]
    fn separate_encoder_files_work_like_folders() {
        // `--clip-l clip_l.safetensors` style: the bare files, no config.json.
        let mut p = paths();
        p.clip_l = fixture("text_encoder/model.safetensors");
        p.t5 = Some(fixture("text_encoder_3/model.safetensors"));
        let (_, t5_len) = (0, prompts().2);
        let a = encode_prompts(
            common::gpu(),
            &paths(),
            &["a photo of a cat".into()],
            t5_len,
            208,
            DType::F32,
        )
        .unwrap();
        let b = encode_prompts(
            common::gpu(),
            &p,
            &["a photo of a cat".into()],
            t5_len,
            208,
            DType::F32,
        )
        .unwrap();
        assert!(
            common::rel_err(
                &b.context,
                &a.context.iter().map(|&x| x as f64).collect::<Vec<_>>()
            ) < 1e-6
        );
    }

    #[test]
    fn missing_encoder_parts_are_named() {
        let dir = std::env::temp_dir().join(format!("sd3-text-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = TextPaths::from_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("text_encoder") && e.contains("missing"), "{e}");
        let mut p = paths();
        p.clip_g = fixture("text_encoder_3/model.safetensors"); // a T5 file where CLIP-G belongs
        let e = encode_prompts(common::gpu(), &p, &["x".into()], 32, 208, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text_model.embeddings.token_embedding.weight") && e.contains("missing"),
            "{e}"
        );
    }
}

/// A T5 encoder GGUF as llama.cpp writes it (city96's: llama.cpp's names,
/// Q8_0/Q5_0 matrices; tools/make_fixtures.py gguf) against transformers on
/// the gguf package's dequantization of the same file: widened to f32, and
/// with the blocks kept packed on the GPU.
#[test]
fn t5_gguf_matches_transformers_on_its_dequantized_weights() {
    use sd3_wgpu::models::t5::{encode, T5};
    use sd3_wgpu::weights::text::TextSource;
    use sd3_wgpu::DType;
    let gpu = common::gpu();
    let src = TextSource::open_file(&fixture("t5.gguf"), "t5xxl").unwrap();
    let io = Checkpoint::open(&[fixture("t5_gguf_io.safetensors")]).unwrap();
    let (shape, ids) = io.read_f32("ids").unwrap();
    let rows: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    let want: Vec<f64> = io
        .read_f32("out")
        .unwrap()
        .1
        .iter()
        .map(|&v| v as f64)
        .collect();
    for matrix in [DType::F32, DType::F16] {
        let t5 = T5::load(gpu, &src, matrix).unwrap();
        let got = encode(gpu, &t5, &rows).unwrap();
        let e = common::rel_err(&got, &want);
        eprintln!("T5 GGUF, matrices {matrix:?}: rel err {e:.2e}");
        assert!(e <= 1e-4, "{matrix:?}: relative error {e:.3e}");
    }
}
