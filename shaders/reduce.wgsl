// Workgroup-wide sum for row kernels of WG invocations (include once per file).

var<workgroup> red: array<f32, WG>;

// Every invocation passes its partial sum and gets the total back; call it
// from uniform control flow (it contains barriers).
fn workgroup_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}
