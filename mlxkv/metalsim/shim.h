// mlxkv Metal simulator: the subset of the Metal Shading Language that mlx
// `mx.fast.metal_kernel` bodies use, as C++17 for g++ on a CPU.
//
// Every GPU thread of a threadgroup runs as a cooperative fiber on one OS thread;
// barriers and simdgroup collectives are rendezvous points of the live threads, so
// they run in lock step. Threadgroup memory and outputs start poisoned (0xFF bytes:
// NaN for floats). See mlxkv/metalsim/__init__.py for what is not emulated.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "msl_math.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ----- scalar types -------------------------------------------------------------
typedef _Float16 half;
typedef half float16_t;
typedef uint32_t uint;
typedef uint16_t ushort;
typedef uint8_t uchar;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
  }
  template <class X, class = std::enable_if_t<std::is_arithmetic<X>::value ||
                                              std::is_same<X, half>::value>>
  bfloat16_t(X x) : bits(round(float(x))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

#define MLXKV_BF_BINOP(op)                                                              \
  inline bfloat16_t operator op(bfloat16_t a, bfloat16_t b) {                          \
    return bfloat16_t(float(a) op float(b));                                            \
  }                                                                                     \
  template <class X, class = std::enable_if_t<std::is_arithmetic<X>::value>>           \
  inline auto operator op(bfloat16_t a, X b) {                                          \
    using R = std::conditional_t<std::is_integral<X>::value, bfloat16_t, X>;           \
    return R(float(a) op float(b));                                                     \
  }                                                                                     \
  template <class X, class = std::enable_if_t<std::is_arithmetic<X>::value>>           \
  inline auto operator op(X a, bfloat16_t b) {                                          \
    using R = std::conditional_t<std::is_integral<X>::value, bfloat16_t, X>;           \
    return R(float(a) op float(b));                                                     \
  }
MLXKV_BF_BINOP(+)
MLXKV_BF_BINOP(-)
MLXKV_BF_BINOP(*)
MLXKV_BF_BINOP(/)
#undef MLXKV_BF_BINOP
#define MLXKV_BF_CMP(op)                                                                \
  inline bool operator op(bfloat16_t a, bfloat16_t b) { return float(a) op float(b); } \
  template <class X, class = std::enable_if_t<std::is_arithmetic<X>::value>>           \
  inline bool operator op(bfloat16_t a, X b) { return float(a) op float(b); }          \
  template <class X, class = std::enable_if_t<std::is_arithmetic<X>::value>>           \
  inline bool operator op(X a, bfloat16_t b) { return float(a) op float(b); }
MLXKV_BF_CMP(<)
MLXKV_BF_CMP(>)
MLXKV_BF_CMP(<=)
MLXKV_BF_CMP(>=)
MLXKV_BF_CMP(==)
MLXKV_BF_CMP(!=)
#undef MLXKV_BF_CMP
inline bfloat16_t operator-(bfloat16_t a) { return bfloat16_t(-float(a)); }
inline bfloat16_t& operator+=(bfloat16_t& a, float b) { return a = bfloat16_t(float(a) + b); }
inline bfloat16_t& operator-=(bfloat16_t& a, float b) { return a = bfloat16_t(float(a) - b); }
inline bfloat16_t& operator*=(bfloat16_t& a, float b) { return a = bfloat16_t(float(a) * b); }
inline bfloat16_t& operator/=(bfloat16_t& a, float b) { return a = bfloat16_t(float(a) / b); }

// ----- small vectors (.x .y .z .w and [], element-wise arithmetic) ------------------
template <class T, int N>
struct mlxkv_vec;
template <class T>
struct mlxkv_vec<T, 2> {
  T x, y;
  mlxkv_vec() = default;
  mlxkv_vec(T v) : x(v), y(v) {}
  mlxkv_vec(T a, T b) : x(a), y(b) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <class T>
struct mlxkv_vec<T, 3> {
  T x, y, z;
  mlxkv_vec() = default;
  mlxkv_vec(T v) : x(v), y(v), z(v) {}
  mlxkv_vec(T a, T b, T c) : x(a), y(b), z(c) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <class T>
struct mlxkv_vec<T, 4> {
  T x, y, z, w;
  mlxkv_vec() = default;
  mlxkv_vec(T v) : x(v), y(v), z(v), w(v) {}
  mlxkv_vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
#define MLXKV_VEC_OP(op)                                                                \
  template <class T, int N>                                                             \
  mlxkv_vec<T, N> operator op(mlxkv_vec<T, N> a, mlxkv_vec<T, N> b) {                   \
    for (int i = 0; i < N; i++) a[i] = a[i] op b[i];                                    \
    return a;                                                                           \
  }                                                                                     \
  template <class T, int N>                                                             \
  mlxkv_vec<T, N> operator op(mlxkv_vec<T, N> a, T b) {                                 \
    for (int i = 0; i < N; i++) a[i] = a[i] op b;                                       \
    return a;                                                                           \
  }
MLXKV_VEC_OP(+)
MLXKV_VEC_OP(-)
MLXKV_VEC_OP(*)
MLXKV_VEC_OP(/)
#undef MLXKV_VEC_OP
#define MLXKV_VEC_TYPES(T, name) \
  typedef mlxkv_vec<T, 2> name##2; \
  typedef mlxkv_vec<T, 3> name##3; \
  typedef mlxkv_vec<T, 4> name##4;
MLXKV_VEC_TYPES(float, float)
MLXKV_VEC_TYPES(half, half)
MLXKV_VEC_TYPES(uint32_t, uint)
MLXKV_VEC_TYPES(int32_t, int)
MLXKV_VEC_TYPES(uint16_t, ushort)
MLXKV_VEC_TYPES(int16_t, short)
MLXKV_VEC_TYPES(uint8_t, uchar)
MLXKV_VEC_TYPES(bool, bool)
#undef MLXKV_VEC_TYPES

// ----- the scheduler: fibers, rendezvous, threadgroup memory -------------------------
namespace mlxkv_sim {

constexpr int kSimdWidth = 32;

struct Ids {
  uint32_t tid;  // thread_index_in_threadgroup
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid;
  uint3 threads_per_grid;
  uint32_t simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint32_t quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

struct Sync;

struct Fiber {
  void* sp = nullptr;
  char* mem = nullptr;  // mapping: guard page + stack
  size_t mem_size = 0;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  Ids ids;
  int state = 0;  // 0 ready, 1 waiting, 2 done
  const char* waiting_site = nullptr;
};

struct Sync {
  int live = 0, arrived = 0;
  const char* site = nullptr;
  const char* op = nullptr;
  void* ctx = nullptr;
  void (*complete)(Sync&) = nullptr;
  std::vector<const void*> in;
  std::vector<void*> out;
  std::vector<char> present;
  std::vector<Fiber*> waiters;
  void reset(int n) {
    live = n;
    arrived = 0;
    site = op = nullptr;
    in.assign(n, nullptr);
    out.assign(n, nullptr);
    present.assign(n, 0);
    waiters.clear();
  }
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<Sync> simd;
  Sync group;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  const std::function<void(const Ids&)>* body = nullptr;
  std::unordered_map<int, void*> arena;
  size_t arena_bytes = 0, arena_peak = 0;
  bool failed = false;
  char* err = nullptr;
  int errlen = 0;
  size_t stack_size = 128 * 1024;
};

inline State& S() {
  static State s;
  return s;
}

inline void fail(const char* fmt, const char* a = "", const char* b = "") {
  State& s = S();
  if (!s.failed) std::snprintf(s.err, s.errlen, fmt, a, b);
  s.failed = true;
}

#if defined(__x86_64__)
extern "C" void mlxkv_sim_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .globl mlxkv_sim_switch
  .hidden mlxkv_sim_switch
  .type mlxkv_sim_switch, @function
mlxkv_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mlxkv_sim_switch, .-mlxkv_sim_switch
)");
#endif

inline void to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  mlxkv_sim_switch(&f->sp, S().sched_sp);
#else
  swapcontext(&f->ctx, &S().sched_ctx);
#endif
}

inline void to_fiber(Fiber* f) {
  State& s = S();
  s.current = f;
#if defined(__x86_64__)
  mlxkv_sim_switch(&s.sched_sp, f->sp);
#else
  swapcontext(&s.sched_ctx, &f->ctx);
#endif
  s.current = nullptr;
}

inline void finish(Sync& y) {
  y.complete(y);
  for (Fiber* w : y.waiters) w->state = 0;
  int live = y.live;
  y.reset(live);
}

// A thread has returned: it leaves its simdgroup's and threadgroup's live sets.
inline void leave(Fiber* f) {
  State& s = S();
  Sync* syncs[2] = {&s.simd[f->ids.tid / kSimdWidth], &s.group};
  for (Sync* y : syncs) {
    y->live--;
    if (y->arrived && y->arrived == y->live) finish(*y);
  }
}

inline void fiber_main() {
  State& s = S();
  Fiber* f = s.current;
  (*s.body)(f->ids);
  f->state = 2;
  leave(f);
  to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}

// The calling thread arrives at a rendezvous; the last live one to arrive runs
// `complete` for everyone. Lanes meeting at different sites or ops are reported.
template <class T, class R, class Op>
R rendezvous(Sync& y, int index, const char* site, const char* opname, const T& v, Op& op) {
  State& s = S();
  Fiber* f = s.current;
  if (f == nullptr) {
    fail("%s at %s: collective in a kernel run without fibers", opname, site);
    return R();
  }
  R out{};
  if (y.arrived == 0) {
    y.site = site;
    y.op = opname;
    y.ctx = &op;
    y.complete = [](Sync& z) { (*static_cast<Op*>(z.ctx))(z); };
  } else if (std::strcmp(y.site, site) != 0 || std::strcmp(y.op, opname) != 0) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "%s at %s", y.op, y.site);
    fail("divergent collective: %s while another lane waits in %s", (std::string(opname) + " at " + site).c_str(), buf);
    to_scheduler(f);
    return out;
  }
  y.in[index] = &v;
  y.out[index] = &out;
  y.present[index] = 1;
  y.arrived++;
  y.waiters.push_back(f);
  f->state = 1;
  f->waiting_site = site;
  if (y.arrived == y.live) finish(y);
  to_scheduler(f);  // lock step: every lane resumes after the collective
  return out;
}

template <class T>
T* arena_alloc(int tag) {
  State& s = S();
  auto it = s.arena.find(tag);
  if (it != s.arena.end()) return static_cast<T*>(it->second);
  void* p = std::aligned_alloc(64, (sizeof(T) + 63) / 64 * 64);
  std::memset(p, 0xFF, sizeof(T));
  s.arena[tag] = p;
  s.arena_bytes += sizeof(T);
  s.arena_peak = std::max(s.arena_peak, s.arena_bytes);
  return static_cast<T*>(p);
}

template <class T>
T& tg_alloc(int tag) {
  return *arena_alloc<T>(tag);
}

inline void clear_arena() {
  State& s = S();
  for (auto& kv : s.arena) std::free(kv.second);
  s.arena.clear();
  s.arena_bytes = 0;
}

inline bool make_stack(Fiber& f, size_t size) {
  if (f.mem == nullptr) {
    size_t page = 4096;
    f.mem_size = size + page;
    void* m = mmap(nullptr, f.mem_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults
    f.mem = static_cast<char*>(m);
  }
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.mem) + f.mem_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  std::memset(sp, 0, 80);
  reinterpret_cast<uint16_t*>(sp)[0] = 0x037f;             // x87 control word
  reinterpret_cast<uint32_t*>(sp)[2] = 0x1f80;             // MXCSR
  sp[8] = reinterpret_cast<uint64_t>(&fiber_main);         // returned into
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.mem + 4096;
  f.ctx.uc_stack.ss_size = f.mem_size - 4096;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
#endif
  return true;
}

inline void free_stacks() {
  for (Fiber& f : S().fibers)
    if (f.mem) munmap(f.mem, f.mem_size);
  S().fibers.clear();
}

inline uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// ----- profiling: device bytes each launch reads and writes --------------------------
// With MLXKV_SIM_PROFILE the kernel is compiled with -fsanitize=thread, which makes the
// compiler call __tsan_readN/__tsan_writeN before every memory access; the definitions
// below (no sanitizer runtime is linked) count the accesses that fall in the launch's
// buffers. Reads count each byte once per threadgroup (what its cache would serve again
// is not device traffic), so a K/V byte read by r threadgroups counts r times; writes
// count every byte written.
#if defined(MLXKV_SIM_PROFILE)
namespace profile {
// Plain arrays only: anything instrumented here would call back into access().
constexpr int kMaxBuffers = 64;
struct Buffer {
  uintptr_t lo, hi;
  uint8_t* seen;      // one flag per byte, cleared between threadgroups
  uint32_t* touched;  // offsets flagged in this threadgroup
  size_t ntouched;
};
inline Buffer buffers[kMaxBuffers];
inline int nbuffers = 0;
inline uint64_t* counts = nullptr;  // [read, written] per buffer, shared with the parent

__attribute__((no_sanitize_thread)) inline void access(const void* p, size_t n, bool write) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (int k = 0; k < nbuffers; k++) {
    Buffer& b = buffers[k];
    if (a < b.lo || a >= b.hi) continue;
    if (write) {
      counts[2 * k + 1] += n;
      return;
    }
    size_t off = a - b.lo, end = off + n, size = b.hi - b.lo;
    for (size_t i = off; i < end && i < size; i++) {
      if (!b.seen[i]) {
        b.seen[i] = 1;
        b.touched[b.ntouched++] = uint32_t(i);
        counts[2 * k] += 1;
      }
    }
    return;
  }
}

__attribute__((no_sanitize_thread)) inline void begin_group() {
  for (int k = 0; k < nbuffers; k++) {
    Buffer& b = buffers[k];
    for (size_t i = 0; i < b.ntouched; i++) b.seen[b.touched[i]] = 0;
    b.ntouched = 0;
  }
}
}  // namespace profile
#define MLXKV_PROFILE_GROUP() ::mlxkv_sim::profile::begin_group()
#else
#define MLXKV_PROFILE_GROUP() ((void)0)
#endif

// Runs every threadgroup of the grid, one after another (in a seeded order when
// seed != 0); returns 0, or 1 with a message in err.
inline int launch(const uint32_t* grid, const uint32_t* group, uint64_t seed, bool fibers,
                  char* err, int errlen, const std::function<void(const Ids&)>& body) {
  State& s = S();
  s.failed = false;
  s.err = err;
  s.errlen = errlen;
  s.body = &body;
  s.arena_peak = 0;
  uint3 tg(std::min(group[0], grid[0]), std::min(group[1], grid[1]), std::min(group[2], grid[2]));
  uint3 ngroups(ceil_div(grid[0], tg.x), ceil_div(grid[1], tg.y), ceil_div(grid[2], tg.z));
  uint32_t full = tg.x * tg.y * tg.z;
  std::vector<uint3> order;
  for (uint32_t z = 0; z < ngroups.z; z++)
    for (uint32_t y = 0; y < ngroups.y; y++)
      for (uint32_t x = 0; x < ngroups.x; x++) order.push_back(uint3(x, y, z));
  std::mt19937_64 rng(seed);
  if (seed) std::shuffle(order.begin(), order.end(), rng);

  for (const uint3& g : order) {
    uint3 size(std::min(tg.x, grid[0] - g.x * tg.x), std::min(tg.y, grid[1] - g.y * tg.y),
               std::min(tg.z, grid[2] - g.z * tg.z));
    uint32_t n = size.x * size.y * size.z;
    MLXKV_PROFILE_GROUP();
    std::vector<Ids> ids(n);
    for (uint32_t t = 0; t < n; t++) {
      Ids& i = ids[t];
      uint3 local(t % size.x, (t / size.x) % size.y, t / (size.x * size.y));
      i.tid = t;
      i.thread_position_in_threadgroup = local;
      i.threadgroup_position_in_grid = g;
      i.thread_position_in_grid =
          uint3(g.x * tg.x + local.x, g.y * tg.y + local.y, g.z * tg.z + local.z);
      i.threads_per_threadgroup = size;
      i.dispatch_threads_per_threadgroup = tg;
      i.threadgroups_per_grid = ngroups;
      i.threads_per_grid = uint3(grid[0], grid[1], grid[2]);
      i.simdgroups_per_threadgroup = ceil_div(n, kSimdWidth);
      i.dispatch_simdgroups_per_threadgroup = ceil_div(full, kSimdWidth);
      i.quadgroups_per_threadgroup = ceil_div(n, 4);
      i.dispatch_quadgroups_per_threadgroup = ceil_div(full, 4);
    }
    if (!fibers) {
      for (uint32_t t = 0; t < n && !s.failed; t++) body(ids[t]);
    } else {
      if (s.fibers.size() < n) s.fibers.resize(n);
      uint32_t nsimd = ceil_div(n, kSimdWidth);
      s.simd.resize(nsimd);
      for (uint32_t k = 0; k < nsimd; k++) s.simd[k].reset(std::min<uint32_t>(kSimdWidth, n - k * kSimdWidth));
      s.group.reset(n);
      for (uint32_t t = 0; t < n; t++) {
        Fiber& f = s.fibers[t];
        f.ids = ids[t];
        f.state = 0;
        f.waiting_site = nullptr;
        if (!make_stack(f, s.stack_size)) {
          fail("could not map fiber stacks%s%s");
          break;
        }
      }
      std::vector<uint32_t> run(n);
      for (uint32_t t = 0; t < n; t++) run[t] = t;
      uint32_t done = 0;
      while (done < n && !s.failed) {
        if (seed) std::shuffle(run.begin(), run.end(), rng);
        bool progress = false;
        for (uint32_t t : run) {
          Fiber& f = s.fibers[t];
          if (f.state != 0) continue;
          progress = true;
          to_fiber(&f);
          if (f.state == 2) done++;
          if (s.failed) break;
        }
        if (!progress && !s.failed) {
          const char* site = "?";
          for (uint32_t t = 0; t < n; t++)
            if (s.fibers[t].state == 1) site = s.fibers[t].waiting_site;
          fail("deadlock: threads wait at %s and no other thread can reach it%s", site);
        }
      }
    }
    clear_arena();
    if (s.failed) break;
  }
  if (!s.failed && s.arena_peak > 32 * 1024)
    std::fprintf(stderr, "metalsim: %zu bytes of threadgroup memory (Apple GPUs allow 32 KiB)\n",
                 s.arena_peak);
  free_stacks();
  return s.failed ? 1 : 0;
}

// ----- collectives ---------------------------------------------------------------
inline Sync& simd_of(Fiber* f) { return S().simd[f->ids.tid / kSimdWidth]; }
inline int lane_of(Fiber* f) { return f->ids.tid % kSimdWidth; }

template <class T, class F>
T simd_reduce(const char* site, const char* name, T v, F combine) {
  Fiber* f = S().current;
  if (!f) {
    fail("%s at %s: collective outside a fiber", name, site);
    return v;
  }
  auto op = [&combine](Sync& y) {
    bool first = true;
    T acc{};
    for (size_t i = 0; i < y.in.size(); i++) {
      if (!y.present[i]) continue;
      T x = *static_cast<const T*>(y.in[i]);
      acc = first ? x : combine(acc, x);
      first = false;
    }
    for (size_t i = 0; i < y.out.size(); i++)
      if (y.present[i]) *static_cast<T*>(y.out[i]) = acc;
  };
  return rendezvous<T, T>(simd_of(f), lane_of(f), site, name, v, op);
}

template <class T, class F>
T simd_scan(const char* site, const char* name, T v, bool inclusive, F combine) {
  Fiber* f = S().current;
  auto op = [&](Sync& y) {
    T acc = T(0);
    for (size_t i = 0; i < y.in.size(); i++) {
      if (!y.present[i]) continue;
      T x = *static_cast<const T*>(y.in[i]);
      if (inclusive) acc = combine(acc, x);
      *static_cast<T*>(y.out[i]) = acc;
      if (!inclusive) acc = combine(acc, x);
    }
  };
  return rendezvous<T, T>(simd_of(f), lane_of(f), site, name, v, op);
}

// Lane i receives the value of lane src(i, arg) (its own value if that lane is outside
// the simdgroup or not live).
template <class T, class F>
T simd_permute_arg(const char* site, const char* name, T v, int arg, F src) {
  Fiber* f = S().current;
  if (!f) {
    fail("%s at %s: collective outside a fiber", name, site);
    return v;
  }
  struct In {
    T v;
    int arg;
  };
  In mine{v, arg};
  auto op = [&src](Sync& y) {
    int n = int(y.in.size());
    for (int i = 0; i < n; i++) {
      if (!y.present[i]) continue;
      const In* me = static_cast<const In*>(y.in[i]);
      int j = src(i, me->arg);
      const In* from = (j >= 0 && j < n && y.present[j]) ? static_cast<const In*>(y.in[j]) : me;
      static_cast<In*>(y.out[i])->v = from->v;
    }
  };
  In r = rendezvous<In, In>(simd_of(f), lane_of(f), site, name, mine, op);
  return r.v;
}

inline void barrier(const char* site, const char* name, bool whole_group) {
  Fiber* f = S().current;
  if (!f) {
    fail("%s at %s: barrier in a kernel run without fibers", name, site);
    return;
  }
  char dummy = 0;
  auto op = [](Sync&) {};
  Sync& y = whole_group ? S().group : simd_of(f);
  int index = whole_group ? int(f->ids.tid) : lane_of(f);
  rendezvous<char, char>(y, index, site, name, dummy, op);
}

}  // namespace mlxkv_sim

// ----- the metal namespace -----------------------------------------------------
namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static half max() { return half(65504.0f); }
  static half lowest() { return half(-65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(std::numeric_limits<float>::infinity()); }
  static half quiet_NaN() { return half(std::numeric_limits<float>::quiet_NaN()); }
};
template <>
struct numeric_limits<bfloat16_t> {
  static bfloat16_t max() { return bfloat16_t(3.38953139e38f); }
  static bfloat16_t lowest() { return bfloat16_t(-3.38953139e38f); }
  static bfloat16_t min() { return bfloat16_t(1.17549435e-38f); }
  static bfloat16_t epsilon() { return bfloat16_t(0.0078125f); }
  static bfloat16_t infinity() { return bfloat16_t(std::numeric_limits<float>::infinity()); }
  static bfloat16_t quiet_NaN() { return bfloat16_t(std::numeric_limits<float>::quiet_NaN()); }
};

template <class To, class From>
To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

#define MLXKV_UNARY(name, fn)                                            \
  inline float name(float x) { return fn(x); }                           \
  inline half name(half x) { return half(fn(float(x))); }                \
  inline bfloat16_t name(bfloat16_t x) { return bfloat16_t(fn(float(x))); }
#define MLXKV_MATH MLXKV_MSL_UNARY_FUNCTIONS(MLXKV_UNARY)
MLXKV_MATH
namespace fast {
MLXKV_MATH
}
namespace precise {
MLXKV_MATH
}
#undef MLXKV_MATH
#undef MLXKV_UNARY

template <class T>
T abs(T x) { return x < T(0) ? T(-x) : x; }
template <class T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
T min(T a, T b) { return b < a ? b : a; }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
template <class T>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float pow(float a, float b) { return __builtin_powf(a, b); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
template <class T>
T select(T a, T b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
template <class T>
T precise_divide(T a, T b) { return a / b; }

// Atomics: threads of a simulated launch share one OS thread, so plain memory
// operations are atomic; the API mirrors Metal's.
enum memory_order { memory_order_relaxed = 0 };
template <class T>
struct atomic {
  T value;
};
typedef atomic<float> atomic_float;
typedef atomic<int> atomic_int;
typedef atomic<uint32_t> atomic_uint;
template <class T>
void atomic_store_explicit(atomic<T>* p, T v, memory_order) { p->value = v; }
template <class T>
T atomic_load_explicit(const atomic<T>* p, memory_order) { return p->value; }
template <class T>
T atomic_exchange_explicit(atomic<T>* p, T v, memory_order) {
  T old = p->value;
  p->value = v;
  return old;
}
template <class T, class U>
T atomic_fetch_add_explicit(atomic<T>* p, U v, memory_order) {
  T old = p->value;
  p->value = old + T(v);
  return old;
}
template <class T, class U>
T atomic_fetch_sub_explicit(atomic<T>* p, U v, memory_order) {
  T old = p->value;
  p->value = old - T(v);
  return old;
}
template <class T, class U>
T atomic_fetch_max_explicit(atomic<T>* p, U v, memory_order) {
  T old = p->value;
  p->value = old < T(v) ? T(v) : old;
  return old;
}
template <class T, class U>
T atomic_fetch_min_explicit(atomic<T>* p, U v, memory_order) {
  T old = p->value;
  p->value = T(v) < old ? T(v) : old;
  return old;
}
template <class T>
bool atomic_compare_exchange_weak_explicit(atomic<T>* p, T* expected, T desired, memory_order,
                                           memory_order) {
  if (std::memcmp(&p->value, expected, sizeof(T)) == 0) {
    p->value = desired;
    return true;
  }
  *expected = p->value;
  return false;
}

// Collectives and barriers (reached through the call-site macros below).
template <class T>
T simd_sum_at(const char* site, T v) {
  return mlxkv_sim::simd_reduce(site, "simd_sum", v, [](T a, T b) { return T(a + b); });
}
template <class T>
T simd_max_at(const char* site, T v) {
  return mlxkv_sim::simd_reduce(site, "simd_max", v, [](T a, T b) { return a < b ? b : a; });
}
template <class T>
T simd_min_at(const char* site, T v) {
  return mlxkv_sim::simd_reduce(site, "simd_min", v, [](T a, T b) { return b < a ? b : a; });
}
template <class T>
T simd_product_at(const char* site, T v) {
  return mlxkv_sim::simd_reduce(site, "simd_product", v, [](T a, T b) { return T(a * b); });
}
inline bool simd_all_at(const char* site, bool v) {
  return mlxkv_sim::simd_reduce(site, "simd_all", v, [](bool a, bool b) { return a && b; });
}
inline bool simd_any_at(const char* site, bool v) {
  return mlxkv_sim::simd_reduce(site, "simd_any", v, [](bool a, bool b) { return a || b; });
}
template <class T>
T simd_prefix_inclusive_sum_at(const char* site, T v) {
  return mlxkv_sim::simd_scan(site, "simd_prefix_inclusive_sum", v, true,
                              [](T a, T b) { return T(a + b); });
}
template <class T>
T simd_prefix_exclusive_sum_at(const char* site, T v) {
  return mlxkv_sim::simd_scan(site, "simd_prefix_exclusive_sum", v, false,
                              [](T a, T b) { return T(a + b); });
}
template <class T>
T simd_shuffle_at(const char* site, T v, ushort lane) {
  return mlxkv_sim::simd_permute_arg(site, "simd_shuffle", v, lane,
                                     [](int, int arg) { return arg; });
}
template <class T>
T simd_broadcast_at(const char* site, T v, ushort lane) {
  return mlxkv_sim::simd_permute_arg(site, "simd_broadcast", v, lane,
                                     [](int, int arg) { return arg; });
}
template <class T>
T simd_broadcast_first_at(const char* site, T v) {
  return mlxkv_sim::simd_permute_arg(site, "simd_broadcast_first", v, 0,
                                     [](int, int) { return 0; });
}
template <class T>
T simd_shuffle_xor_at(const char* site, T v, ushort mask) {
  return mlxkv_sim::simd_permute_arg(site, "simd_shuffle_xor", v, mask,
                                     [](int i, int arg) { return i ^ arg; });
}
template <class T>
T simd_shuffle_down_at(const char* site, T v, ushort delta) {
  return mlxkv_sim::simd_permute_arg(site, "simd_shuffle_down", v, delta,
                                     [](int i, int arg) { return i + arg; });
}
template <class T>
T simd_shuffle_up_at(const char* site, T v, ushort delta) {
  return mlxkv_sim::simd_permute_arg(site, "simd_shuffle_up", v, delta,
                                     [](int i, int arg) { return i - arg; });
}
inline void threadgroup_barrier_at(const char* site, mem_flags) {
  mlxkv_sim::barrier(site, "threadgroup_barrier", true);
}
inline void simdgroup_barrier_at(const char* site, mem_flags) {
  mlxkv_sim::barrier(site, "simdgroup_barrier", false);
}

}  // namespace metal

using namespace metal;

#define MLXKV_STR2(x) #x
#define MLXKV_STR(x) MLXKV_STR2(x)
#define MLXKV_SITE __FILE__ ":" MLXKV_STR(__LINE__)
#define simd_sum(...) simd_sum_at(MLXKV_SITE, __VA_ARGS__)
#define simd_max(...) simd_max_at(MLXKV_SITE, __VA_ARGS__)
#define simd_min(...) simd_min_at(MLXKV_SITE, __VA_ARGS__)
#define simd_product(...) simd_product_at(MLXKV_SITE, __VA_ARGS__)
#define simd_all(...) simd_all_at(MLXKV_SITE, __VA_ARGS__)
#define simd_any(...) simd_any_at(MLXKV_SITE, __VA_ARGS__)
#define simd_prefix_inclusive_sum(...) simd_prefix_inclusive_sum_at(MLXKV_SITE, __VA_ARGS__)
#define simd_prefix_exclusive_sum(...) simd_prefix_exclusive_sum_at(MLXKV_SITE, __VA_ARGS__)
#define simd_shuffle(...) simd_shuffle_at(MLXKV_SITE, __VA_ARGS__)
#define simd_broadcast(...) simd_broadcast_at(MLXKV_SITE, __VA_ARGS__)
#define simd_broadcast_first(...) simd_broadcast_first_at(MLXKV_SITE, __VA_ARGS__)
#define simd_shuffle_xor(...) simd_shuffle_xor_at(MLXKV_SITE, __VA_ARGS__)
#define simd_shuffle_down(...) simd_shuffle_down_at(MLXKV_SITE, __VA_ARGS__)
#define simd_shuffle_up(...) simd_shuffle_up_at(MLXKV_SITE, __VA_ARGS__)
#define threadgroup_barrier(...) threadgroup_barrier_at(MLXKV_SITE, __VA_ARGS__)
#define simdgroup_barrier(...) simdgroup_barrier_at(MLXKV_SITE, __VA_ARGS__)

// Address-space qualifiers have no meaning on a CPU (threadgroup declarations were
// rewritten into arena slots before compiling).
#define device
#define constant
#define thread
#define threadgroup

#if defined(MLXKV_SIM_PROFILE)
// The sanitizer's entry points, defined here instead of its runtime: memory accesses go
// to the profile, atomics do what they say (sequentially consistent), the rest nothing.
extern "C" {
#define MLXKV_ACCESS(n)                                                                      \
  __attribute__((no_sanitize_thread)) void __tsan_read##n(void* p) {                         \
    ::mlxkv_sim::profile::access(p, n, false);                                               \
  }                                                                                          \
  __attribute__((no_sanitize_thread)) void __tsan_unaligned_read##n(void* p) {               \
    ::mlxkv_sim::profile::access(p, n, false);                                               \
  }                                                                                          \
  __attribute__((no_sanitize_thread)) void __tsan_write##n(void* p) {                        \
    ::mlxkv_sim::profile::access(p, n, true);                                                \
  }                                                                                          \
  __attribute__((no_sanitize_thread)) void __tsan_unaligned_write##n(void* p) {              \
    ::mlxkv_sim::profile::access(p, n, true);                                                \
  }
MLXKV_ACCESS(1)
MLXKV_ACCESS(2)
MLXKV_ACCESS(4)
MLXKV_ACCESS(8)
MLXKV_ACCESS(16)
#undef MLXKV_ACCESS
__attribute__((no_sanitize_thread)) void __tsan_read_range(void* p, unsigned long n) {
  ::mlxkv_sim::profile::access(p, n, false);
}
__attribute__((no_sanitize_thread)) void __tsan_write_range(void* p, unsigned long n) {
  ::mlxkv_sim::profile::access(p, n, true);
}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void*) {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
#define MLXKV_ATOMICS(bits, T)                                                                   \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_load(const volatile T* a, int) {  \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) void __tsan_atomic##bits##_store(volatile T* a, T v, int) { \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                   \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) int __tsan_atomic##bits##_compare_exchange_strong(        \
      volatile T* a, T* c, T v, int, int) {                                                     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) int __tsan_atomic##bits##_compare_exchange_weak(          \
      volatile T* a, T* c, T v, int, int) {                                                     \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
  }                                                                                             \
  __attribute__((no_sanitize_thread)) T __tsan_atomic##bits##_compare_exchange_val(             \
      volatile T* a, T c, T v, int, int) {                                                      \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
    return c;                                                                                   \
  }
MLXKV_ATOMICS(8, uint8_t)
MLXKV_ATOMICS(16, uint16_t)
MLXKV_ATOMICS(32, uint32_t)
MLXKV_ATOMICS(64, uint64_t)
#undef MLXKV_ATOMICS

// Called by the simulator before a profiled launch: the launch's buffers ([lo, hi) pairs)
// and where to count (2 * n uint64: read, written), in memory the parent process reads.
__attribute__((visibility("default"), no_sanitize_thread)) void mlxkv_sim_profile(
    const uint64_t* ranges, int n, uint64_t* counts) {
  namespace pf = ::mlxkv_sim::profile;
  pf::nbuffers = n < pf::kMaxBuffers ? n : pf::kMaxBuffers;
  for (int k = 0; k < pf::nbuffers; k++) {
    size_t size = ranges[2 * k + 1] - ranges[2 * k];
    pf::buffers[k] = {ranges[2 * k], ranges[2 * k + 1],
                      static_cast<uint8_t*>(std::calloc(size + 1, 1)),
                      static_cast<uint32_t*>(std::calloc(size + 1, sizeof(uint32_t))), 0};
  }
  pf::counts = counts;
}
}
#endif
