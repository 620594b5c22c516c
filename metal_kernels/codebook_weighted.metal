// Probabilities times values stored as codebook codes (mlxkv/cache/codebook.py), in the
// rotated space: o[r, d] = sum_t p[r, t] * scale[t] * levels[code(t, d)], read straight
// from the codes through the codebook in threadgroup memory. Planes as in
// codebook_scores.metal.
// Template: T (probability and output dtype), D (head dim), W0, W1.
// Inputs:  p (BH, M, n) T; plane0 (BH, n, D * W0 / 32) uint32; plane1 (BH, n, D * W1 / 32)
//          uint32 (8 zeros when W1 = 0); scale (BH, n) float16; levels (16,) float32;
//          dims = [BH, M, n].
// Outputs: out (BH, M, D) T (rotated; the caller rotates it back).
// Grid (D, BH * M, 1), threadgroup (min(D, 256), 1, 1).
threadgroup float lv[16];
if (thread_index_in_threadgroup == 0) {  // a threadgroup may have a single thread
  for (int k = 0; k < 16; k++) {
    lv[k] = levels[k];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
int d = int(thread_position_in_grid.x);
int row = int(thread_position_in_grid.y);
int BH = dims[0], M = dims[1], n = dims[2];
if (d < D && row < BH * M) {
  int bh = row / M;
  const int P0 = 32 / W0;
  const device T* pr = p + size_t(row) * n;
  float acc = 0.0f;
  for (int t = 0; t < n; t++) {
    size_t slot = size_t(bh) * n + t;
    uint code = (plane0[slot * (D / P0) + d / P0] >> ((d % P0) * W0)) & ((1u << W0) - 1u);
    if (W1 > 0) {
      const int P1 = 32 / (W1 > 0 ? W1 : 1);
      code |= ((plane1[slot * (D / P1) + d / P1] >> ((d % P1) * W1)) & ((1u << W1) - 1u)) << W0;
    }
    acc += float(pr[t]) * float(scale[slot]) * lv[code];
  }
  out[size_t(row) * D + d] = T(acc);
}
