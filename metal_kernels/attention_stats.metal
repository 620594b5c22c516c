// Attention statistics for eviction policies, from the scores the fused attention
// wrote (no second pass over the cache): the attention mass each token received from
// query rows [lo, hi) of a chunk, summed over the query heads sharing a kv head.
// H2O accumulates it over decode steps; SnapKV takes the last rows of a prompt chunk
// (its observation window).
// Inputs:  scores (B, Hq, L, T) float32 (-inf where a row cannot see a token);
//          lse (B, Hq, L) float32 (log-sum-exp of each row); dims = [H, Hq, L, T, lo, hi].
// Outputs: mass (B, H, T) float32.
// Grid (T, B * H, 1), threadgroup (min(T, 256), 1, 1).
int t = int(thread_position_in_grid.x);
int bh = int(thread_position_in_grid.y);
int H = dims[0], Hq = dims[1], L = dims[2], T = dims[3], lo = dims[4], hi = dims[5];
if (t >= T) {
  return;
}
int rep = Hq / H;
int b = bh / H, h = bh % H;
float acc = 0.0f;
for (int r = 0; r < rep; r++) {
  size_t row0 = (size_t(b) * Hq + h * rep + r) * L;
  for (int l = lo; l < hi; l++) {
    float s = scores[(row0 + l) * T + t];
    if (s != -INFINITY) {
      acc += exp(s - lse[row0 + l]);
    }
  }
}
mass[size_t(bh) * T + t] = acc;
