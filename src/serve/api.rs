//! The request bodies the server takes — A1111's `txt2img`/`img2img`, the
//! OpenAI images API and our own `/jobs` — read into [`GenerateRequest`]s
//! with every field checked: unknown fields, wrong types and values out of
//! range are errors that name the field.

use std::sync::Arc;

use base64::Engine;
use serde_json::{Map, Value};

use crate::image_io::ImageSource;
use crate::pipeline::{GenerateRequest, MAX_BATCH, MAX_PROMPT_BYTES, MAX_STEPS};

/// A request the server refuses: the HTTP status and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// 400, 404, 413, 422, 500, 503, …
    pub status: u16,
    /// The message, naming the field or value at fault.
    pub message: String,
}

impl ApiError {
    /// A 422: the request is well-formed JSON but a value is not acceptable.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 422,
            message: message.into(),
        }
    }
}

/// The largest side a request may ask for (the model's grid is checked too).
pub const MAX_SIDE: u64 = 8192;

/// A JSON object's fields, taken one by one; what is left at the end is unknown.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn parse(body: &[u8]) -> Result<Fields, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
            status: 400,
            message: format!("the body is not valid JSON: {e}"),
        })?;
        match v {
            Value::Object(map) => Ok(Fields { map }),
            other => Err(ApiError {
                status: 400,
                message: format!("the body must be a JSON object, got {}", kind(&other)),
            }),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                if s.len() > MAX_PROMPT_BYTES {
                    return Err(ApiError::invalid(format!(
                        "{name}: {} bytes, more than {MAX_PROMPT_BYTES}",
                        s.len()
                    )));
                }
                Ok(Some(s))
            }
            Some(v) => Err(type_error(name, "a string", &v)),
        }
    }

    fn uint(&mut self, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| type_error(name, "a whole number", &v))?;
                if !(lo..=hi).contains(&n) {
                    return Err(ApiError::invalid(format!(
                        "{name}: {n} is out of range {lo}..={hi}"
                    )));
                }
                Ok(Some(n))
            }
        }
    }

    fn float(&mut self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| type_error(name, "a number", &v))?;
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(format!(
                        "{name}: {x} is out of range {lo}..={hi}"
                    )));
                }
                Ok(Some(x))
            }
        }
    }

    /// A seed: a whole number ≥ 0, or -1 (A1111's "random").
    fn seed(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => match (v.as_u64(), v.as_i64()) {
                (Some(n), _) => Ok(Some(n)),
                (None, Some(-1)) => Ok(None),
                _ => Err(type_error(name, "a whole number ≥ 0 or -1 (random)", &v)),
            },
        }
    }

    /// Fields accepted when their value changes nothing here (`false`, 0,
    /// empty, or one of `allowed`): front-ends send them with every request.
    fn neutral(&mut self, name: &str, allowed: &[Value]) -> Result<(), ApiError> {
        if let Some(v) = self.take(name) {
            let empty = match &v {
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                Value::Null => true,
            };
            if !empty && !allowed.contains(&v) {
                return Err(ApiError::invalid(format!(
                    "{name}: {v} is not supported by sd3-wgpu (leave it out or at its default)"
                )));
            }
        }
        Ok(())
    }

    /// Fields that never change the image (saving, display): any value.
    fn ignore(&mut self, names: &[&str]) {
        for n in names {
            self.map.remove(*n);
        }
    }

    fn finish(self) -> Result<(), ApiError> {
        let mut names: Vec<&String> = self.map.keys().collect();
        names.sort();
        match names.first() {
            None => Ok(()),
            Some(_) => Err(ApiError::invalid(format!(
                "unknown field{} {}",
                if names.len() > 1 { "s" } else { "" },
                names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn type_error(name: &str, want: &str, got: &Value) -> ApiError {
    let shown: String = got.to_string().chars().take(40).collect();
    ApiError::invalid(format!(
        "{name}: expected {want}, got {} {shown}",
        kind(got)
    ))
}

/// A base64 image (optionally a `data:image/…;base64,` URL) as an input image.
fn image(name: &str, v: Value) -> Result<ImageSource, ApiError> {
    let s = match v {
        Value::String(s) => s,
        other => return Err(type_error(name, "a base64 PNG or JPEG", &other)),
    };
    let payload = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, b)| b).unwrap_or(""),
        None => s.as_str(),
    };
    let data = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::invalid(format!("{name}: not base64: {e}")))?;
    Ok(ImageSource::Bytes {
        name: name.to_string(),
        data: Arc::new(data),
    })
}

/// A seed for requests that ask for a random one.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // A1111 and ComfyUI show seeds below 2^32.
    h.finish() & 0xffff_ffff
}

/// The common settings: prompt, sizes, steps, guidance, seed, batch.
fn common(f: &mut Fields, batch_field: &str) -> Result<GenerateRequest, ApiError> {
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt: missing"))?;
    let mut req = GenerateRequest::new(&prompt);
    req.negative_prompt = f.string("negative_prompt")?.unwrap_or_default();
    req.width = f.uint("width", 16, MAX_SIDE)?.map(|v| v as usize);
    req.height = f.uint("height", 16, MAX_SIDE)?.map(|v| v as usize);
    req.steps = f.uint("steps", 1, MAX_STEPS as u64)?.map(|v| v as usize);
    req.cfg = f
        .float("cfg_scale", 0.0, crate::pipeline::MAX_GUIDANCE as f64)?
        .map(|v| v as f32);
    req.shift = f.float("shift", 0.01, crate::pipeline::MAX_SHIFT)?;
    req.seed = f.seed("seed")?.unwrap_or_else(random_seed);
    req.batch = f.uint(batch_field, 1, MAX_BATCH as u64)?.unwrap_or(1) as usize;
    Ok(req)
}

/// A1111's `POST /sdapi/v1/txt2img` and `img2img` bodies (`img2img` takes
/// `init_images` with one image, `denoising_strength`, `mask`, `mask_blur`).
/// Fields that only concern saving or display are accepted; those that
/// would change the image in ways this engine does not implement are
/// accepted only at their neutral values.
pub fn a1111(body: &[u8], img2img: bool) -> Result<GenerateRequest, ApiError> {
    let mut f = Fields::parse(body)?;
    let mut req = common(&mut f, "batch_size")?;
    f.uint("n_iter", 1, 1)?;
    for name in ["sampler_name", "sampler_index"] {
        if let Some(s) = f.string(name)? {
            if !s.eq_ignore_ascii_case("euler") {
                return Err(ApiError::invalid(format!(
                    "{name}: {s:?}: only \"Euler\" (flow-matching Euler, SD3's sampler) is implemented"
                )));
            }
        }
    }
    if let Some(s) = f.string("scheduler")? {
        if !["automatic", "simple", "sgm_uniform"].contains(&s.to_ascii_lowercase().as_str()) {
            return Err(ApiError::invalid(format!(
                "scheduler: {s:?}: only SD3's shifted flow-matching schedule is implemented (\"Automatic\")"
            )));
        }
    }
    // Saving, display and bookkeeping; `eta` and the s_* noise bounds only
    // act through `s_churn` (checked below); `subseed` only through
    // `subseed_strength`.
    f.ignore(&[
        "save_images",
        "send_images",
        "do_not_save_samples",
        "do_not_save_grid",
        "comments",
        "force_task_id",
        "disable_extra_networks",
        "include_init_images",
        "override_settings_restore_afterwards",
        "eta",
        "s_tmax",
        "s_tmin",
        "s_noise",
        "subseed",
        "firstphase_width",
        "firstphase_height",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name",
        "hr_sampler_name",
        "hr_scheduler",
        "hr_prompt",
        "hr_negative_prompt",
        "hr_cfg",
        "hr_distilled_cfg",
        "denoising_strength_hr",
        "refiner_switch_at",
    ]);
    for name in [
        "enable_hr",
        "restore_faces",
        "tiling",
        "subseed_strength",
        "override_settings",
        "alwayson_scripts",
        "refiner_checkpoint",
        "styles",
        "infotext",
        "script_name",
        "script_args",
        "s_churn",
        "s_min_uncond",
    ] {
        f.neutral(name, &[])?;
    }
    for name in ["seed_resize_from_h", "seed_resize_from_w"] {
        f.neutral(name, &[Value::from(-1)])?;
    }
    if img2img {
        let mut images = match f.take("init_images") {
            Some(Value::Array(a)) => a,
            Some(v) => return Err(type_error("init_images", "an array of one image", &v)),
            None => return Err(ApiError::invalid("init_images: missing")),
        };
        if images.len() != 1 {
            return Err(ApiError::invalid(format!(
                "init_images: {} images; give exactly one",
                images.len()
            )));
        }
        req.init_image = Some(image("init_images[0]", images.remove(0))?);
        // A1111's default strength.
        req.strength = f.float("denoising_strength", 0.0, 1.0)?.unwrap_or(0.75);
        if let Some(m) = f.take("mask") {
            req.mask = Some(image("mask", m)?);
            let blur = f
                .float("mask_blur", 0.0, crate::pipeline::MAX_MASK_BLUR)?
                .unwrap_or(0.0);
            req.mask_blur = blur as f32;
            for name in ["mask_blur_x", "mask_blur_y"] {
                if let Some(v) = f.float(name, 0.0, crate::pipeline::MAX_MASK_BLUR)? {
                    if v != blur {
                        return Err(ApiError::invalid(format!(
                            "{name}: {v}: only a blur equal in both directions (mask_blur {blur}) is implemented"
                        )));
                    }
                }
            }
            // Whole-picture inpainting that starts from the image ("original"),
            // the mask split at one half, as diffusers' SD3 inpainting does.
            f.neutral("inpaint_full_res", &[])?;
            f.neutral("inpaint_full_res_padding", &[])?;
            if let Some(v) = f.uint("inpainting_fill", 0, 3)? {
                if v != 1 {
                    return Err(ApiError::invalid(format!(
                        "inpainting_fill: {v}: only 1 (start from the original image) is implemented"
                    )));
                }
            }
            if let Some(v) = f.take("mask_round") {
                if v != Value::Bool(true) {
                    return Err(ApiError::invalid(format!(
                        "mask_round: {v}: the mask is always split at one half (true)"
                    )));
                }
            }
        } else {
            // A1111 sends the inpainting fields with every img2img request.
            f.ignore(&[
                "mask_blur",
                "mask_blur_x",
                "mask_blur_y",
                "inpainting_fill",
                "inpaint_full_res",
                "inpaint_full_res_padding",
                "mask_round",
            ]);
        }
        f.neutral("inpainting_mask_invert", &[])?;
        f.neutral("resize_mode", &[])?;
        f.neutral("latent_mask", &[])?;
        f.neutral(
            "initial_noise_multiplier",
            &[Value::from(1), Value::from(1.0)],
        )?;
        f.ignore(&["image_cfg_scale"]);
    } else {
        // Only the high-resolution pass (enable_hr, refused above) uses it.
        f.ignore(&["denoising_strength"]);
    }
    f.finish()?;
    Ok(req)
}

/// How an OpenAI images client wants its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFormat {
    /// Base64 PNG in the response.
    B64Json,
    /// A URL on this server (`/jobs/{id}/images/{n}`).
    Url,
}

/// The OpenAI images API's `POST /v1/images/generations` body: `prompt`,
/// `n`, `size` (`WxH` or `auto`), `response_format`, `output_format` (png),
/// `model`, `user`, `quality`, `style` (accepted; one model is served); and
/// this engine's own `negative_prompt`, `steps`, `cfg_scale`, `seed`.
pub fn openai(body: &[u8]) -> Result<(GenerateRequest, ResponseFormat), ApiError> {
    let mut f = Fields::parse(body)?;
    let mut req = common(&mut f, "n")?;
    if let Some(size) = f.string("size")? {
        if size != "auto" {
            let parsed = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u64>().ok()?, h.parse::<u64>().ok()?)));
            match parsed {
                Some((w, h)) if (16..=MAX_SIDE).contains(&w) && (16..=MAX_SIDE).contains(&h) => {
                    req.width = Some(w as usize);
                    req.height = Some(h as usize);
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "size: {size:?}: expected WIDTHxHEIGHT (e.g. 1024x1024, sides 16..={MAX_SIDE}) or auto"
                    )))
                }
            }
        }
    }
    let format = match f.string("response_format")?.as_deref() {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "response_format: {other:?}: expected \"b64_json\" or \"url\""
            )))
        }
    };
    if let Some(o) = f.string("output_format")? {
        if o != "png" {
            return Err(ApiError::invalid(format!(
                "output_format: {o:?}: only \"png\" is written"
            )));
        }
    }
    f.string("model")?;
    f.string("user")?;
    if let Some(b) = f.string("background")? {
        if b == "transparent" {
            return Err(ApiError::invalid(
                "background: \"transparent\": images are opaque RGB",
            ));
        }
    }
    f.ignore(&["quality", "style", "moderation"]);
    f.finish()?;
    Ok((req, format))
}

/// Our own `POST /jobs` body (what the web page sends): the common
/// settings (`prompt`, `negative_prompt`, `width`, `height`, `steps`,
/// `cfg_scale`, `shift`, `seed`, `batch`).
pub fn job(body: &[u8]) -> Result<GenerateRequest, ApiError> {
    let mut f = Fields::parse(body)?;
    let req = common(&mut f, "batch")?;
    f.finish()?;
    Ok(req)
}
