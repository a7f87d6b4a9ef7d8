// Workgroup-wide reductions for the row kernels (one workgroup of WG
// invocations per row; include once per file). Entry points take `ids:
// RowIds`. With SUBGROUP each subgroup reduces in registers (subgroupAdd /
// subgroupMax) and one partial per subgroup goes through workgroup memory;
// without, a tree over workgroup memory. Call from uniform control flow
// (they contain barriers).

struct RowIds {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUP
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
#endif
}

var<workgroup> red: array<f32, WG>;

#if SUBGROUP
// Every invocation passes its partial and gets the total back.
fn workgroup_sum(v: f32, ids: RowIds) -> f32 {
    let s = subgroupAdd(v);
    if (ids.sg_lane == 0u) {
        red[ids.sg_id] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < ids.sg_count; i++) {
        total += red[i];
    }
    workgroupBarrier();
    return total;
}

fn workgroup_max(v: f32, ids: RowIds) -> f32 {
    let s = subgroupMax(v);
    if (ids.sg_lane == 0u) {
        red[ids.sg_id] = s;
    }
    workgroupBarrier();
    var m = red[0];
    for (var i = 1u; i < ids.sg_count; i++) {
        m = max(m, red[i]);
    }
    workgroupBarrier();
    return m;
}
#else
// Every invocation passes its partial and gets the total back.
fn workgroup_sum(v: f32, ids: RowIds) -> f32 {
    red[ids.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (ids.lid < s) {
            red[ids.lid] += red[ids.lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn workgroup_max(v: f32, ids: RowIds) -> f32 {
    red[ids.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (ids.lid < s) {
            red[ids.lid] = max(red[ids.lid], red[ids.lid + s]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    return m;
}
#endif
