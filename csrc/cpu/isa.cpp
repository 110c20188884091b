// Runtime choice of the CPU kernel variant. The extension is built once for any x86-64 (never tuned
// to the build host): each kernel TU is compiled for one ISA (kernels_<isa>.cpp) and the best one the
// CPU supports is called. No ISA-specific code runs before the CPU was checked for it.
#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include <unistd.h>

#include "kernels.h"

namespace bnext {
namespace cpu {
namespace {

struct Variant {
  const char* name;
  bool (*supported)();
  const KernelTable& (*table)();
};

bool always() {
  return true;
}

#if defined(__x86_64__)
bool has_avx2() {
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif

// Best first.
const Variant kVariants[] = {
#if defined(__x86_64__)
    {"avx512bf16", has_avx512bf16, avx512bf16::table},
    {"avx512", has_avx512, avx512::table},
    {"avx2", has_avx2, avx2::table},
#endif
    {"baseline", always, baseline::table},
};

const Variant& best() {
  for (const Variant& v : kVariants) {
    if (v.supported()) {
      return v;
    }
  }
  return kVariants[sizeof(kVariants) / sizeof(kVariants[0]) - 1];
}

// The forced variant's name, or an empty string when BNEXT_CPU_ISA is unset/empty.
const Variant& select() {
  const char* forced = std::getenv("BNEXT_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') {
    return best();
  }
  for (const Variant& v : kVariants) {
    if (std::strcmp(v.name, forced) == 0) {
      TORCH_CHECK(
          v.supported(), "bnext: BNEXT_CPU_ISA=", forced,
          " names a kernel variant this CPU does not support; unset it or use one of: ", supported_isas());
      return v;
    }
  }
  TORCH_CHECK(
      false, "bnext: BNEXT_CPU_ISA must be one of ", supported_isas(), " (or unset), got '", forced, "'");
  return best();
}

}  // namespace

std::string supported_isas() {
  std::string out;
  for (const Variant& v : kVariants) {
    if (v.supported()) {
      out += out.empty() ? "" : ", ";
      out += v.name;
    }
  }
  return out;
}

namespace {
// The cache this process's cores share: Linux describes it per core in sysfs, where
// sysconf(_SC_LEVEL3_CACHE_SIZE) may report the whole socket's L3 instead (see
// docs/performance.md#cache-sizes).
int64_t sysfs_cache_bytes(int index) {
  char path[96];
  std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) {
    return 0;
  }
  long long value = 0;
  char unit = 0;
  const int got = std::fscanf(f, "%lld%c", &value, &unit);
  std::fclose(f);
  if (got < 1 || value <= 0) {
    return 0;
  }
  return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : value;
}

// sysconf(name) where the C library knows it, else 0.
int64_t sysconf_bytes(int name) {
  const long bytes = sysconf(name);
  return bytes > 0 ? bytes : 0;
}

// The first cache level's data cache: the first sysfs entry of type Data (the entries go by
// level, so it is level 1's), else sysconf, else 32 KiB (the smallest L1D of the x86-64 cores
// this runs on).
int64_t l1d_bytes() {
  for (int index = 0; index < 4; ++index) {
    char path[96];
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr) {
      break;
    }
    char type[16] = {};
    const int got = std::fscanf(f, "%15s", type);
    std::fclose(f);
    if (got == 1 && std::strcmp(type, "Data") == 0) {
      const int64_t bytes = sysfs_cache_bytes(index);
      if (bytes > 0) {
        return bytes;
      }
    }
  }
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  if (const int64_t bytes = sysconf_bytes(_SC_LEVEL1_DCACHE_SIZE); bytes > 0) {
    return bytes;
  }
#endif
  return int64_t(32) << 10;
}

int64_t last_level_cache_bytes() {
  for (int index = 4; index >= 2; --index) {
    const int64_t bytes = sysfs_cache_bytes(index);
    if (bytes > 0) {
      return bytes;
    }
  }
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
    if (const int64_t bytes = sysconf_bytes(name); bytes > 0) {
      return bytes;
    }
  }
#endif
  return int64_t(32) << 20;
}
// The part of the last-level cache this process can count on: at most kCacheBytesPerCore per CPU
// it may run on. A virtual machine's sysfs may describe the host's whole L3 although every other
// core of the host shares it; a pass that streams only above that size then stores outputs that
// cannot stay cached, and streaming what would have stayed in L2 loses (see
// docs/performance.md#streaming-threshold).
constexpr int64_t kCacheBytesPerCore = int64_t(4) << 20;

// AMD's L3 is described per core complex (the complex's own L3, not the host's), and there
// streaming what fits in half of it loses clearly, while a pass that touches more than that still
// gains from streaming (see docs/performance.md#streaming-threshold).
bool amd_cache_complex() {
#if defined(__x86_64__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// Bytes an elementwise pass touches above which it streams its output.
int64_t stream_threshold_bytes() {
  const int64_t llc = last_level_cache_bytes();
  if (amd_cache_complex()) {
    return llc / 2;
  }
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  const int64_t share = cpus > 0 ? std::min<int64_t>(llc, kCacheBytesPerCore * cpus) : llc;
  return share / 4 * 3;
}
}  // namespace

int64_t l1_data_cache_bytes() {
  static const int64_t bytes = l1d_bytes();
  return bytes;
}

bool stream_outputs(int64_t bytes) {
  const char* forced = std::getenv("BNEXT_CPU_STREAM_BYTES");
  if (forced != nullptr && forced[0] != '\0') {
    char* end = nullptr;
    const long long threshold = std::strtoll(forced, &end, 10);
    TORCH_CHECK(
        end != forced && *end == '\0' && threshold >= 0,
        "bnext: BNEXT_CPU_STREAM_BYTES must be a non-negative integer (bytes), got '", forced, "'");
    return bytes > threshold || threshold == 0;
  }
  static const int64_t threshold = stream_threshold_bytes();
  return bytes > threshold;
}

const KernelTable& kernels() {
  return select().table();
}

const char* active_isa() {
  try {
    return select().name;
  } catch (const c10::Error&) {
    return "invalid BNEXT_CPU_ISA";
  }
}

}  // namespace cpu
}  // namespace bnext
