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

/// Subgroup sizes the tensor-core kernels are built for (a group of S
/// invocations per fragment set, S the adapter's largest subgroup size).
/// Override-constant values, hence f64.
pub const COOP_SUBGROUP_SIZES: &[f64] = &[4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// The output tile of the portable register-tiled GEMM (linear.wgsl): a
/// workgroup computes bm × bn outputs, each invocation a 4×4 block, stepping
/// bk along k. Chosen per adapter by `sd3 tune` (a short sweep, cached on
/// disk; see [`crate::tune`]), [`GemmTile::DEFAULT`] otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmTile {
    /// Rows of the tile.
    pub bm: u32,
    /// Columns of the tile.
    pub bn: u32,
    /// Step along k.
    pub bk: u32,
}

impl GemmTile {
    /// The tile used where no sweep has chosen one.
    pub const DEFAULT: GemmTile = GemmTile {
        bm: 64,
        bn: 64,
        bk: 16,
    };

    /// The tiles a sweep tries, the default first.
    pub const CANDIDATES: &'static [GemmTile] = &[
        GemmTile::DEFAULT,
        GemmTile {
            bm: 64,
            bn: 64,
            bk: 8,
        },
        GemmTile {
            bm: 64,
            bn: 64,
            bk: 32,
        },
        GemmTile {
            bm: 32,
            bn: 64,
            bk: 16,
        },
        GemmTile {
            bm: 64,
            bn: 32,
            bk: 16,
        },
        GemmTile {
            bm: 32,
            bn: 32,
            bk: 16,
        },
        GemmTile {
            bm: 128,
            bn: 64,
            bk: 16,
        },
        GemmTile {
            bm: 64,
            bn: 128,
            bk: 16,
        },
        GemmTile {
            bm: 128,
            bn: 128,
            bk: 8,
        },
    ];

    /// Invocations per workgroup.
    pub fn invocations(self) -> u32 {
        (self.bm / 4) * (self.bn / 4)
    }

    /// Bytes of workgroup memory (the x and w tiles, f32).
    pub fn workgroup_bytes(self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }

    /// Whether the device's limits allow this tile.
    pub fn fits(self, l: &wgpu::Limits) -> bool {
        self.invocations() <= l.max_compute_invocations_per_workgroup
            && self.invocations() <= l.max_compute_workgroup_size_x
            && self.workgroup_bytes() <= l.max_compute_workgroup_storage_size
    }

    /// `64x64x16`.
    pub fn name(self) -> String {
        format!("{}x{}x{}", self.bm, self.bn, self.bk)
    }

    /// Parses `64x64x16`; only [`GemmTile::CANDIDATES`] are accepted.
    pub fn parse(s: &str) -> Option<GemmTile> {
        GemmTile::CANDIDATES
            .iter()
            .copied()
            .find(|t| t.name() == s.trim())
    }
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
    /// The portable GEMM's tile.
    pub gemm_tile: GemmTile,
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
            gemm_tile: GemmTile::DEFAULT,
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

    /// The side F of the square f16 → f32 fragments the tensor-core kernels
    /// use: 16 where the adapter offers 16×16×16, else 8, else why not. Also
    /// refuses f32 activations (tensor-core inputs are f16, and `--dtype f32`
    /// stays the exact path) and an unknown or unsupported subgroup size
    /// (the kernels' groups are whole subgroups); returns (F, subgroup size).
    pub fn coop_fragment(&self) -> Result<(u32, u32), String> {
        if self.activation != DType::F16 {
            return Err("activations are f32 (the exact path): tensor-core inputs are f16".into());
        }
        let has = |f: u32| {
            self.coop
                .iter()
                .any(|c| c.m == f && c.n == f && c.k == f && c.ab == "f16" && c.c == "f32")
        };
        let f = if has(16) {
            16
        } else if has(8) {
            8
        } else {
            return Err("no 16×16 or 8×8 f16 → f32 fragment configuration".into());
        };
        let s = self.subgroup_max;
        if !COOP_SUBGROUP_SIZES.contains(&(s as f64)) {
            return Err(format!(
                "subgroups of {s}: the kernels are built for {COOP_SUBGROUP_SIZES:?}"
            ));
        }
        Ok((f, s))
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
