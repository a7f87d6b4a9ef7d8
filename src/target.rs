//! What recording knows about the device: the optional features an op's
//! implementations may use, the cooperative-matrix configurations, the limits,
//! the activation dtype and whether only portable kernels may be chosen.
//!
//! Models never look at the target; op families do, to pick the first of
//! their implementations that supports a call (see [`crate::ops::choice`]).

use crate::tensor::DType;

/// An optional capability that an implementation may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `SHADER_F16`: f16 arithmetic and storage in WGSL.
    F16,
    /// `SUBGROUP`: subgroup operations.
    Subgroup,
    /// `EXPERIMENTAL_COOPERATIVE_MATRIX`: tensor-core fragments.
    Coop,
}

impl Feature {
    /// The name used by `SD3_REQUIRE` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Feature::F16 => "f16",
            Feature::Subgroup => "subgroup",
            Feature::Coop => "coop",
        }
    }

    /// Parses `f16`, `subgroup` or `coop`.
    pub fn parse(s: &str) -> Option<Feature> {
        match s.trim() {
            "f16" => Some(Feature::F16),
            "subgroup" | "subgroups" => Some(Feature::Subgroup),
            "coop" | "cooperative-matrix" => Some(Feature::Coop),
            _ => None,
        }
    }
}

/// Which implementations recording may choose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    /// The first implementation the device supports.
    #[default]
    Auto,
    /// Only implementations that need no optional feature: the reference path.
    Portable,
}

impl KernelChoice {
    /// Parses `auto` or `portable`.
    pub fn parse(s: &str) -> Option<KernelChoice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(KernelChoice::Auto),
            "portable" => Some(KernelChoice::Portable),
            _ => None,
        }
    }

    /// From `SD3_KERNELS` (auto when unset).
    pub fn from_env() -> Result<KernelChoice, String> {
        match std::env::var("SD3_KERNELS") {
            Ok(v) if !v.is_empty() => KernelChoice::parse(&v)
                .ok_or_else(|| format!("SD3_KERNELS={v:?}: expected auto or portable")),
            _ => Ok(KernelChoice::Auto),
        }
    }
}

/// One cooperative-matrix configuration the adapter offers: fragments of
/// M×K (A) and K×N (B) accumulated into M×N (C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopConfig {
    /// Rows of A and C.
    pub m: u32,
    /// Columns of B and C.
    pub n: u32,
    /// Columns of A, rows of B.
    pub k: u32,
    /// Element type of A and B (`f16`, `f32`, …).
    pub ab: &'static str,
    /// Element type of C and the result.
    pub c: &'static str,
}

/// The device as recording sees it.
#[derive(Clone, Debug)]
pub struct Target {
    /// `SHADER_F16` is enabled.
    pub f16: bool,
    /// `unpack2x16float` works (f16 weights in f32 shaders).
    pub f16_weights: bool,
    /// `SUBGROUP` is enabled.
    pub subgroup: bool,
    /// The adapter's largest subgroup size (0 when unknown).
    pub subgroup_max: u32,
    /// Cooperative-matrix configurations (empty without the feature).
    pub coop: Vec<CoopConfig>,
    /// The device's limits.
    pub limits: wgpu::Limits,
    /// Element type of activations.
    pub activation: DType,
    /// Which implementations may be chosen.
    pub kernels: KernelChoice,
}

impl Target {
    /// A target with no optional feature and WebGPU's default limits (for
    /// recording graphs that are only inspected, never planned).
    pub fn portable() -> Target {
        Target {
            f16: false,
            f16_weights: true,
            subgroup: false,
            subgroup_max: 0,
            coop: Vec::new(),
            limits: wgpu::Limits::default(),
            activation: DType::F32,
            kernels: KernelChoice::Portable,
        }
    }

    /// Whether the device offers `f` (regardless of [`KernelChoice`]).
    pub fn has(&self, f: Feature) -> bool {
        match f {
            Feature::F16 => self.f16,
            Feature::Subgroup => self.subgroup,
            Feature::Coop => !self.coop.is_empty(),
        }
    }

    /// Why an implementation needing `needs` cannot be chosen here, if it cannot.
    pub fn refuses(&self, needs: &[Feature]) -> Option<String> {
        if self.kernels == KernelChoice::Portable && !needs.is_empty() {
            return Some("--kernels portable".into());
        }
        needs
            .iter()
            .find(|f| !self.has(**f))
            .map(|f| format!("the adapter lacks {}", f.name()))
    }
}
