//! Portability without the hardware: every shader specialisation the engine
//! can request is parsed and validated by naga and translated to SPIR-V
//! (Vulkan), MSL (Metal) and HLSL (DX12). Also checks each kernel's Rust-side
//! declarations against naga's reading of the WGSL: the binding list, the
//! params struct field by field (name, offset, type), the override constants
//! Rust sets, and the `const`s both sides must agree on.

use naga::back::{hlsl, msl, spv, PipelineConstants};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::{AddressSpace, ShaderStage, StorageAccess};
use sd3_wgpu::gpu::{shader, Access, Field, Kernel, ParamsLayout, Scalar};
use sd3_wgpu::ops::all_kernels;

/// Every subset of the kernel's flags.
fn flag_sets(k: &Kernel) -> Vec<Vec<&'static str>> {
    (0..1u32 << k.flags.len())
        .map(|mask| {
            k.flags
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, f)| *f)
                .collect()
        })
        .collect()
}

/// Every combination of the kernel's override constant values (its fixed
/// overrides always set, as the engine does).
fn constant_sets(k: &Kernel) -> Vec<Vec<(&'static str, f64)>> {
    // Every value of every per-call constant at least once: the first value
    // of each, then each other value with the rest at their first (the
    // values size arrays and workgroups independently, and the full product
    // of tile sides would multiply the translations for nothing).
    let fixed: Vec<(&'static str, f64)> = k.overrides.iter().map(|&(n, v)| (n, v as f64)).collect();
    let base: Vec<(&'static str, f64)> = fixed
        .iter()
        .copied()
        .chain(
            k.constants
                .iter()
                .filter_map(|(n, vals)| vals.first().map(|v| (*n, *v))),
        )
        .collect();
    let mut sets = vec![base.clone()];
    for (name, values) in k.constants {
        for &v in values.iter().skip(1) {
            let mut s = base.clone();
            if let Some(e) = s.iter_mut().find(|e| e.0 == *name) {
                e.1 = v;
            }
            sets.push(s);
        }
    }
    sets
}

/// Whether a kernel uses cooperative matrices: translated for SPIR-V and MSL
/// (2.3+) only — DX12 has none in wgpu, and the engine never chooses such a
/// kernel there (the adapter does not report the feature).
fn is_coop(k: &Kernel) -> bool {
    shader::source(k.file).is_ok_and(|s| s.contains("enable wgpu_cooperative_matrix"))
}

fn parse(k: &Kernel, flags: &[&str]) -> (naga::Module, naga::valid::ModuleInfo) {
    let what = format!("{} ({}) with flags {flags:?}", k.file, k.entry);
    let src = shader::preprocess(k.file, flags).unwrap_or_else(|e| panic!("{what}: {e}"));
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    // unpack2x16float needs SHADER_FLOAT16_IN_FLOAT32, which wgpu grants on
    // Vulkan, Metal and DX12 (downlevel flag SHADER_F16_IN_F32).
    let info = Validator::new(
        ValidationFlags::all(),
        Capabilities::default()
            | Capabilities::SHADER_FLOAT16_IN_FLOAT32
            | Capabilities::SHADER_FLOAT16
            | Capabilities::COOPERATIVE_MATRIX
            | Capabilities::SUBGROUP,
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    (module, info)
}

#[test]
fn every_specialisation_translates_to_spirv_msl_and_hlsl() {
    let mut count = 0;
    for k in all_kernels() {
        for flags in flag_sets(k) {
            let (module, info) = parse(k, &flags);
            for consts in constant_sets(k) {
                let what = format!(
                    "{} ({}) flags {flags:?} constants {consts:?}",
                    k.file, k.entry
                );
                let mut pc = PipelineConstants::default();
                for (n, v) in &consts {
                    pc.insert(n.to_string(), *v);
                }
                let (m, i) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((ShaderStage::Compute, k.entry)),
                    &pc,
                )
                .unwrap_or_else(|e| panic!("{what}: overrides: {e}"));
                let spv_opts = spv::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: k.entry.to_string(),
                };
                spv::write_vec(&m, &i, &spv::Options::default(), Some(&spv_opts))
                    .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));
                let msl_opts = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, k.entry.to_string())),
                    ..Default::default()
                };
                let msl_lang = msl::Options {
                    lang_version: if is_coop(k) { (2, 3) } else { (2, 0) },
                    ..Default::default()
                };
                msl::write_string(&m, &i, &msl_lang, &msl_opts)
                    .unwrap_or_else(|e| panic!("{what}: MSL: {e}"));
                if is_coop(k) {
                    count += 1;
                    continue;
                }
                // f16 storage needs shader model 6.2 (DXC with 16-bit types).
                let hlsl_opts = hlsl::Options {
                    shader_model: hlsl::ShaderModel::V6_2,
                    ..Default::default()
                };
                let hlsl_pipe = hlsl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, k.entry.to_string())),
                };
                let mut out = String::new();
                hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
                    .write(&m, &i, None)
                    .unwrap_or_else(|e| panic!("{what}: HLSL: {e}"));
                count += 1;
            }
        }
    }
    // 7 families; a drop here means kernels silently left the list.
    eprintln!("{count} specialisations translated");
    assert!(count >= 25, "only {count} specialisations checked");
}

/// The scalar kind and count of a params member (vectors and arrays of
/// vectors count their scalars).
fn flatten(module: &naga::Module, ty: naga::Handle<naga::Type>) -> Option<(Scalar, usize)> {
    use naga::{ArraySize, ScalarKind, TypeInner};
    let scalar = |s: naga::Scalar| match (s.kind, s.width) {
        (ScalarKind::Uint, 4) => Some(Scalar::U32),
        (ScalarKind::Sint, 4) => Some(Scalar::I32),
        (ScalarKind::Float, 4) => Some(Scalar::F32),
        _ => None,
    };
    match &module.types[ty].inner {
        TypeInner::Scalar(s) => Some((scalar(*s)?, 1)),
        TypeInner::Vector { size, scalar: s } => Some((scalar(*s)?, *size as usize)),
        TypeInner::Array {
            base,
            size: ArraySize::Constant(n),
            ..
        } => {
            let (s, c) = flatten(module, *base)?;
            Some((s, c * n.get() as usize))
        }
        _ => None,
    }
}

/// Compares a Rust params layout with the WGSL struct bound at 0, field by
/// field; the first difference, in words.
fn params_mismatch(
    layout: &ParamsLayout,
    module: &naga::Module,
    ty: naga::Handle<naga::Type>,
) -> Option<String> {
    let naga::TypeInner::Struct { members, span } = &module.types[ty].inner else {
        return Some("the params binding is not a struct".into());
    };
    if *span as usize != layout.size {
        return Some(format!(
            "WGSL Params is {span} bytes, the Rust struct {}",
            layout.size
        ));
    }
    if members.len() != layout.fields.len() {
        return Some(format!(
            "WGSL Params has {} fields, the Rust struct {}",
            members.len(),
            layout.fields.len()
        ));
    }
    for (m, f) in members.iter().zip(layout.fields) {
        let wgsl = Field {
            name: "",
            offset: m.offset as usize,
            ty: Scalar::U32,
            len: 0,
        };
        let (ty, len) = match flatten(module, m.ty) {
            Some(x) => x,
            None => {
                return Some(format!(
                    "field '{:?}' has a type params cannot hold",
                    m.name
                ))
            }
        };
        if m.name.as_deref() != Some(f.name)
            || wgsl.offset != f.offset
            || ty != f.ty
            || len != f.len
        {
            return Some(format!(
                "WGSL field {:?} at byte {} ({ty:?} × {len}) vs Rust field '{}' at byte {} ({:?} × {})",
                m.name, m.offset, f.name, f.offset, f.ty, f.len
            ));
        }
    }
    None
}

#[test]
fn a_swapped_params_field_fails_the_layout_check() {
    let k = &sd3_wgpu::ops::linear::LINEAR;
    let (module, _) = parse(k, &[]);
    let params = module
        .global_variables
        .iter()
        .find(|(_, g)| g.binding.as_ref().is_some_and(|b| b.binding == 0))
        .map(|(_, g)| g.ty)
        .unwrap();
    assert_eq!(params_mismatch(k.params, &module, params), None);
    // lda and ldw exchanged on the Rust side: same size, same types, wrong meaning.
    let mut fields: Vec<Field> = k.params.fields.to_vec();
    let (a, b) = (
        fields.iter().position(|f| f.name == "lda").unwrap(),
        fields.iter().position(|f| f.name == "ldw").unwrap(),
    );
    let (oa, ob) = (fields[a].offset, fields[b].offset);
    fields[a].offset = ob;
    fields[b].offset = oa;
    fields.swap(a, b);
    let swapped = ParamsLayout {
        size: k.params.size,
        fields: Box::leak(fields.into_boxed_slice()),
    };
    let e = params_mismatch(&swapped, &module, params).expect("the swap is caught");
    assert!(e.contains("lda") || e.contains("ldw"), "{e}");
}

#[test]
fn overrides_and_shared_consts_match_the_wgsl() {
    for k in all_kernels() {
        let (module, _) = parse(k, &[]);
        let what = format!("{} ({})", k.file, k.entry);
        let mut wgsl: Vec<String> = module
            .overrides
            .iter()
            .filter_map(|(_, o)| o.name.clone())
            .collect();
        wgsl.sort();
        // The kernels of one file share its overrides.
        let mut rust: Vec<String> = all_kernels()
            .into_iter()
            .filter(|o| o.file == k.file)
            .flat_map(|o| {
                o.overrides
                    .iter()
                    .map(|(n, _)| n.to_string())
                    .chain(o.constants.iter().map(|(n, _)| n.to_string()))
            })
            .collect();
        rust.sort();
        rust.dedup();
        assert_eq!(
            wgsl, rust,
            "{what}: override constants in the WGSL vs those Rust sets"
        );
        for (_, o) in module.overrides.iter() {
            let fixed = k
                .overrides
                .iter()
                .any(|(n, _)| Some(*n) == o.name.as_deref());
            assert!(
                !fixed || o.init.is_none(),
                "{what}: override {:?} has a WGSL default; Rust is its only source",
                o.name
            );
        }
        for (name, value) in k.consts {
            let c = module
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(*name))
                .unwrap_or_else(|| panic!("{what}: no `const {name}` in the WGSL"))
                .1;
            let got = match module.global_expressions[c.init] {
                naga::Expression::Literal(naga::Literal::U32(v)) => v,
                ref e => panic!("{what}: const {name} is {e:?}, not a u32 literal"),
            };
            assert_eq!(got, *value, "{what}: const {name} in the WGSL vs Rust");
        }
    }
}

#[test]
fn binding_lists_and_params_match_the_wgsl() {
    for k in all_kernels() {
        for flags in flag_sets(k) {
            let (module, _) = parse(k, &flags);
            let what = format!("{} ({}) flags {flags:?}", k.file, k.entry);
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).expect("layout");
            let global = |binding: u32| {
                module
                    .global_variables
                    .iter()
                    .map(|(_, g)| g)
                    .find(|g| {
                        g.binding
                            .as_ref()
                            .is_some_and(|b| b.group == 0 && b.binding == binding)
                    })
                    .unwrap_or_else(|| panic!("{what}: no global at binding {binding}"))
            };
            let params = global(0);
            assert_eq!(
                params.space,
                AddressSpace::Uniform,
                "{what}: binding 0 must be the params uniform"
            );
            assert_eq!(
                layouter[params.ty].size as usize, k.params.size,
                "{what}: size of Params"
            );
            if let Some(e) = params_mismatch(k.params, &module, params.ty) {
                panic!("{what}: {e}");
            }
            for (i, b) in k.bindings.iter().enumerate() {
                let g = global(i as u32 + 1);
                assert_eq!(g.name.as_deref(), Some(b.name), "{what}: binding {}", i + 1);
                let AddressSpace::Storage { access } = g.space else {
                    panic!(
                        "{what}: binding {} ('{}') is not a storage buffer",
                        i + 1,
                        b.name
                    );
                };
                let writes = access.contains(StorageAccess::STORE);
                assert_eq!(
                    writes,
                    b.access == Access::ReadWrite,
                    "{what}: access of '{}'",
                    b.name
                );
            }
            let extra = module
                .global_variables
                .iter()
                .filter(|(_, g)| {
                    g.binding
                        .as_ref()
                        .is_some_and(|b| b.binding as usize > k.bindings.len())
                })
                .count();
            assert_eq!(
                extra, 0,
                "{what}: the WGSL declares bindings the Rust list lacks"
            );
        }
    }
}

#[test]
fn preprocessor_rejects_unknown_directives_and_flags() {
    assert!(shader::preprocess("no-such-file.wgsl", &[]).is_err());
    for (name, _) in shader::SOURCES {
        let known = shader::known_flags(name).unwrap();
        let flags: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
        shader::preprocess(name, &flags).expect("every shader preprocesses");
        let e = shader::preprocess(name, &["W_F61"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown flag 'W_F61'"), "{name}: {e}");
    }
    for k in all_kernels() {
        let mut known = shader::known_flags(k.file).unwrap();
        known.sort();
        let mut declared: Vec<String> = k.flags.iter().map(|f| f.to_string()).collect();
        declared.sort();
        assert_eq!(
            known, declared,
            "{} ({}): the flags its #if directives test",
            k.file, k.entry
        );
    }
}
