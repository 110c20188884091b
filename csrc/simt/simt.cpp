// The SIMT emulator behind simt.h: fibers, barriers, warp exchange, launch checks and the launch
// log. One launch runs at a time (a process-wide mutex): __shared__ variables are statics.
#include "simt.h"

#include <cxxabi.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define BNEXT_SIMT_ASAN 1
#endif

namespace bnext {
namespace simt {
namespace {

// The kernels keep little on the stack. Under ASan every swapcontext clears the shadow of the
// target stack; at 128 KiB that is a 16 KiB memset, larger stacks make ASan unmap and remap shadow
// pages on every switch (a system call each, minutes of system time for the ASan matrix).
constexpr size_t kStackBytes = 128 * 1024;
constexpr int kWarp = 32;
// Driver limits of every architecture bnext targets (sm_75 .. sm_90).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned kMaxGridX = 2147483647u;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxDynamicShared = 48 * 1024;

enum class FiberState { Ready, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0;
  int lane = 0;
  int warp = 0;
  FiberState state = FiberState::Ready;
  uint64_t wait_gen = 0;
  void* asan_fake_stack = nullptr;
};

struct Warp {
  uint64_t gen = 0;
  unsigned arrived = 0;
  unsigned mask = 0;
  unsigned members = 0;  // lanes that exist in this (possibly partial) warp
  unsigned exited = 0;
  uint64_t slots[kWarp] = {};
};

struct Block {
  dim3 grid, block;
  uint3 bid{0, 0, 0};
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  uint64_t gen = 0;
  int arrived = 0;
  int live = 0;
  unsigned char* shared = nullptr;
  std::string error;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
};

std::mutex g_launch_mutex;
std::mutex g_log_mutex;
std::vector<LaunchRecord> g_log;
std::atomic<bool> g_reverse{false};

thread_local Block* g_block = nullptr;
thread_local Fiber* g_fiber = nullptr;

// Fiber stacks, reused by every block and launch (guarded by g_launch_mutex).
std::vector<char*> g_stacks;

char* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      throw std::runtime_error("bnext simt: cannot map a fiber stack");
    }
    g_stacks.push_back(static_cast<char*>(p));
  }
  return g_stacks[i];
}

[[noreturn]] void fail(const std::string& what) {
  std::ostringstream os;
  os << "bnext simt: " << what;
  if (g_block != nullptr && g_fiber != nullptr) {
    os << " (block (" << g_block->bid.x << "," << g_block->bid.y << "," << g_block->bid.z << "), thread ("
       << g_fiber->tid.x << "," << g_fiber->tid.y << "," << g_fiber->tid.z << "))";
  }
  throw std::runtime_error(os.str());
}

// Fiber -> scheduler. `exiting` frees ASan's fake stack of a fiber that will not run again.
void to_scheduler(bool exiting) {
  Fiber* f = g_fiber;
  Block* b = g_block;
#ifdef BNEXT_SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake_stack, b->scheduler_stack, b->scheduler_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&f->ctx, &b->scheduler);
#ifdef BNEXT_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &b->scheduler_stack, &b->scheduler_stack_size);
#endif
}

void complete_block_barrier_if_ready(Block* b) {
  if (b->arrived > 0 && b->arrived == b->live) {
    ++b->gen;
    b->arrived = 0;
  }
}

void fiber_main() {
  Fiber* f = g_fiber;
  Block* b = g_block;
#ifdef BNEXT_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->scheduler_stack, &b->scheduler_stack_size);
#endif
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    b->error = e.what();
  } catch (...) {
    b->error = "bnext simt: unknown exception in a kernel";
  }
  f->state = FiberState::Done;
  --b->live;
  Warp& w = b->warps[f->warp];
  w.exited |= 1u << f->lane;
  if (b->error.empty() && w.arrived != 0 && ((w.mask >> f->lane) & 1u)) {
    b->error = "bnext simt: a lane exited while its warp waited for it in a warp-synchronous call";
  }
  complete_block_barrier_if_ready(b);
  to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

bool runnable(const Block& b, const Fiber& f) {
  switch (f.state) {
    case FiberState::Ready:
      return true;
    case FiberState::WaitBlock:
      return b.gen != f.wait_gen;
    case FiberState::WaitWarp:
      return b.warps[f.warp].gen != f.wait_gen;
    case FiberState::Done:
      return false;
  }
  return false;
}

void run_block(Block& b) {
  const unsigned nthreads = b.block.x * b.block.y * b.block.z;
  const unsigned nwarps = (nthreads + kWarp - 1) / kWarp;
  b.fibers.assign(nthreads, Fiber{});
  b.warps.assign(nwarps, Warp{});
  b.gen = 0;
  b.arrived = 0;
  b.live = static_cast<int>(nthreads);
  b.error.clear();
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = static_cast<int>(i);
    f.tid = uint3{i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
    f.lane = static_cast<int>(i % kWarp);
    f.warp = static_cast<int>(i / kWarp);
    b.warps[f.warp].members |= 1u << f.lane;
    f.stack = stack_for(i);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  unsigned done = 0;
  while (done < nthreads) {
    bool progress = false;
    done = 0;
    for (Fiber& f : b.fibers) {
      if (f.state == FiberState::Done) {
        ++done;
        continue;
      }
      if (!runnable(b, f)) {
        continue;
      }
      progress = true;
      f.state = FiberState::Ready;
      g_fiber = &f;
#ifdef BNEXT_SIMT_ASAN
      __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, f.stack, kStackBytes);
#endif
      swapcontext(&b.scheduler, &f.ctx);
#ifdef BNEXT_SIMT_ASAN
      __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
      g_fiber = nullptr;
      if (!b.error.empty()) {
        throw std::runtime_error(b.error);
      }
      if (f.state == FiberState::Done) {
        ++done;
      }
    }
    if (!progress && done < nthreads) {
      int at_block = 0, at_warp = 0;
      for (const Fiber& f : b.fibers) {
        at_block += f.state == FiberState::WaitBlock;
        at_warp += f.state == FiberState::WaitWarp;
      }
      std::ostringstream os;
      os << "bnext simt: deadlock in block (" << b.bid.x << "," << b.bid.y << "," << b.bid.z << "): " << at_block
         << " threads wait in __syncthreads, " << at_warp << " in warp-synchronous calls";
      throw std::runtime_error(os.str());
    }
  }
}

void check_launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes) {
  std::ostringstream os;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 ||
      block.y > 1024 || block.z > kMaxBlockZ) {
    os << "invalid block (" << block.x << "," << block.y << "," << block.z << ")";
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ ||
             grid.z > kMaxGridYZ) {
    os << "invalid grid (" << grid.x << "," << grid.y << "," << grid.z << ")";
  } else if (shared_bytes > kMaxDynamicShared) {
    os << "dynamic shared memory of " << shared_bytes << " bytes exceeds " << kMaxDynamicShared;
  } else {
    return;
  }
  throw std::runtime_error(std::string("bnext simt: launch of ") + name + ": " + os.str() + " (invalid configuration argument)");
}

Block& current_block() {
  if (g_block == nullptr || g_fiber == nullptr) {
    fail("a device function was called outside a kernel launch");
  }
  return *g_block;
}

}  // namespace

const uint3& thread_idx() {
  current_block();
  return g_fiber->tid;
}

const uint3& block_idx() {
  return current_block().bid;
}

const dim3& block_dim() {
  return current_block().block;
}

const dim3& grid_dim() {
  return current_block().grid;
}

int lane_id() {
  current_block();
  return g_fiber->lane;
}

void* dynamic_shared() {
  return current_block().shared;
}

void syncthreads() {
  Block& b = current_block();
  Fiber* f = g_fiber;
  f->wait_gen = b.gen;
  f->state = FiberState::WaitBlock;
  ++b.arrived;
  complete_block_barrier_if_ready(&b);
  to_scheduler(false);
}

void syncwarp(unsigned mask) {
  Block& b = current_block();
  Fiber* f = g_fiber;
  Warp& w = b.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  if (!(mask & bit)) {
    fail("warp-synchronous call from a lane outside its own mask");
  }
  if (mask & ~w.members) {
    fail("warp mask names lanes that do not exist in this block (blockDim not a multiple of 32?)");
  }
  if (mask & w.exited) {
    fail("warp mask names lanes that have already exited");
  }
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fail("lanes of one warp-synchronous call passed different masks");
  }
  w.arrived |= bit;
  f->wait_gen = w.gen;
  f->state = FiberState::WaitWarp;
  if (w.arrived == w.mask) {
    ++w.gen;
    w.arrived = 0;
  }
  to_scheduler(false);
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane) {
  Block& b = current_block();
  Warp& w = b.warps[g_fiber->warp];
  w.slots[g_fiber->lane] = value;
  syncwarp(mask);
  if (src_lane < 0 || src_lane >= kWarp || !((mask >> src_lane) & 1u)) {
    fail("shuffle reads lane " + std::to_string(src_lane) + ", which is not in the mask");
  }
  const uint64_t out = w.slots[src_lane];
  // No lane may deposit its next value before every lane has read this one.
  syncwarp(mask);
  return out;
}

void run(
    const char* name,
    const std::string& signature,
    dim3 grid,
    dim3 block,
    size_t shared_bytes,
    const std::function<void()>& body) {
  check_launch(name, grid, block, shared_bytes);
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log.push_back(LaunchRecord{name, signature, grid, block, shared_bytes});
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  auto shared = std::make_unique<unsigned char[]>(shared_bytes + 16);
  unsigned char* aligned =
      shared.get() + (16 - reinterpret_cast<uintptr_t>(shared.get()) % 16) % 16;
  Block b;
  b.grid = grid;
  b.block = block;
  b.body = &body;
  b.shared = aligned;
  Block* const saved_block = g_block;
  g_block = &b;
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  const bool reverse = g_reverse.load();
  try {
    for (unsigned long long k = 0; k < nblocks; ++k) {
      const unsigned long long i = reverse ? nblocks - 1 - k : k;
      b.bid = uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                    static_cast<unsigned>(i / (1ull * grid.x * grid.y))};
      std::memset(aligned, 0xFF, shared_bytes);
      run_block(b);
    }
  } catch (...) {
    g_block = saved_block;
    throw;
  }
  g_block = saved_block;
}

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

std::vector<LaunchRecord> launches() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  return g_log;
}

void reset_launches() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.clear();
}

void set_block_order(bool reverse) {
  g_reverse.store(reverse);
}

}  // namespace simt
}  // namespace bnext
