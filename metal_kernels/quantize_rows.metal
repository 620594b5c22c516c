// Affine quantization of rows into mlxkv's packed layout (the layout and rounding of
// MLX's CPU mx.quantize, affine.h): one simdgroup per (row, group of G values). Each lane
// takes G/32 values, simd_min/simd_max give the group's range, and the lanes pack the
// group's codes into its words together.
// Inputs:  x (N, DX) of type T; dims = [N, DX].
// Outputs: w (N, DX * BITS / 32) uint32, scales (N, DX / G) T, biases (N, DX / G) T.
// Grid (32, N * DX / G, 1), threadgroup (32, min(QB, N * DX / G), 1): QB simdgroups at most.
constexpr int E = G / 32;
constexpr int W = G * BITS / 32;  // words per group
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int n = dims[0], dx = dims[1];
int groups = dx / G;
int pair = int(thread_position_in_grid.y);  // row * groups + group
threadgroup uint8_t codes[QB * G];
if (pair >= n * groups) {
  return;  // uniform across the simdgroup
}
const device T* xs = x + size_t(pair) * G + lane * E;  // rows are dx = groups * G apart
float v[E];
float lo = float(xs[0]), hi = lo;
for (int e = 0; e < E; e++) {
  v[e] = float(xs[e]);
  lo = min(lo, v[e]);
  hi = max(hi, v[e]);
}
lo = simd_min(lo);
hi = simd_max(hi);
mlxkv_affine sb = mlxkv_affine_params(lo, hi, BITS);
if (lane == 0) {
  scales[pair] = static_cast<T>(sb.scale);
  biases[pair] = static_cast<T>(sb.bias);
}
threadgroup uint8_t* mine = codes + sg * G;
for (int e = 0; e < E; e++) {
  mine[lane * E + e] = uint8_t(mlxkv_affine_code(v[e], sb, BITS));
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int word = int(lane); word < W; word += 32) {
  w[size_t(pair) * W + word] = mlxkv_pack_word(mine, G, BITS, word);
}
