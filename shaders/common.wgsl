// Helpers shared by every kernel family.

// Elementwise kernels dispatch a 2-D grid so that more than 65535 workgroups fit:
// the flat index runs row-major over (y, x) workgroups, then the local index.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, wg_size: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * wg_size + lid;
}

// Workgroup size of the elementwise and row kernels: set from Rust (ops::WG)
// at pipeline creation; a power of two (the row reductions halve it).
override WG: u32;
