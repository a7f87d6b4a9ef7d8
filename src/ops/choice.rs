//! Several implementations of one op, chosen per device at record time.
//!
//! An op family lists its implementations in order of preference (fastest
//! first, the composed reference last). Each says which optional features it
//! needs and whether it supports a particular call on a particular
//! [`Target`]; the first that does is recorded, and every node it records is
//! tagged with its name, which profiles, traces and `sd3 bench kernels` show.
//! The tests walk the same lists, so every implementation the test adapter
//! supports runs against the one CPU reference.

use crate::error::{Error, Result};
use crate::graph::{Graph, Value};
use crate::target::{Feature, Target};

/// One implementation of an op whose arguments are `A`.
pub struct Implementation<A: 'static> {
    /// Its name in reports (`flash`, `composed`, …).
    pub name: &'static str,
    /// Optional features it needs (empty: plain WGSL, runs everywhere).
    pub needs: &'static [Feature],
    /// Whether it can take this call on this target; why not, when it cannot.
    pub supports: fn(&Target, &A) -> std::result::Result<(), String>,
    /// Records it into the graph.
    pub record: fn(&mut Graph, &A) -> Result<Value>,
}

impl<A> Implementation<A> {
    /// Why this implementation cannot take `args` on `target`, if it cannot.
    pub fn refusal(&self, target: &Target, args: &A) -> Option<String> {
        target
            .refuses(self.needs)
            .or_else(|| (self.supports)(target, args).err())
    }

    /// Records this implementation, its nodes tagged with its name.
    pub fn record(&self, g: &mut Graph, args: &A) -> Result<Value> {
        g.with_implementation(self.name, |g| (self.record)(g, args))
    }
}

/// Records the first implementation in `list` that supports `args` on the
/// graph's target.
pub fn record_first<A>(
    g: &mut Graph,
    kind: &str,
    list: &'static [Implementation<A>],
    args: &A,
) -> Result<Value> {
    let mut reasons = Vec::new();
    for imp in list {
        match imp.refusal(g.target(), args) {
            None => return imp.record(g, args),
            Some(r) => reasons.push(format!("{}: {r}", imp.name)),
        }
    }
    Err(Error::Shape {
        op: g.label(kind),
        msg: format!("no implementation takes this call ({})", reasons.join("; ")),
    })
}
