// Scores of rotated queries against keys stored as codebook codes (mlxkv/cache/codebook.py):
// s[r, t] = scale[t] * sum_d q[r, d] * levels[code(t, d)], read straight from the codes
// through the codebook, held in threadgroup memory (no dequantized keys anywhere).
// Codes are bit planes: plane 0 holds the low W0 bits of each code, 32 / W0 codes per
// uint32; plane 1 (W1 > 0) the next W1 bits.
// Template: T (query and output dtype), D (head dim), W0, W1 (plane widths; W1 = 0: one
// plane).
// Inputs:  q (BH, M, D) T, rotated; plane0 (BH, n, D * W0 / 32) uint32; plane1 (BH, n,
//          D * W1 / 32) uint32 (8 zeros when W1 = 0); scale (BH, n) float16;
//          levels (16,) float32 (the first 2^(W0 + W1) used); dims = [BH, M, n].
// Outputs: scores (BH, M, n) T.
// Grid (n, BH * M, 1), threadgroup (min(n, 256), 1, 1).
threadgroup float lv[16];
if (thread_index_in_threadgroup == 0) {  // a threadgroup may have a single thread
  for (int k = 0; k < 16; k++) {
    lv[k] = levels[k];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
int t = int(thread_position_in_grid.x);
int row = int(thread_position_in_grid.y);
int BH = dims[0], M = dims[1], n = dims[2];
if (t < n && row < BH * M) {
  int bh = row / M;
  const int P0 = 32 / W0;
  const device uint* c0 = plane0 + (size_t(bh) * n + t) * (D / P0);
  const device T* qr = q + size_t(row) * D;
  float acc = 0.0f;
  for (int d = 0; d < D; d++) {
    uint code = (c0[d / P0] >> ((d % P0) * W0)) & ((1u << W0) - 1u);
    if (W1 > 0) {
      const int P1 = 32 / (W1 > 0 ? W1 : 1);
      const device uint* c1 = plane1 + (size_t(bh) * n + t) * (D / P1);
      code |= ((c1[d / P1] >> ((d % P1) * W1)) & ((1u << W1) - 1u)) << W0;
    }
    acc += float(qr[d]) * lv[code];
  }
  scores[size_t(row) * n + t] = T(acc * float(scale[size_t(bh) * n + t]));
}
