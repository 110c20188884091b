// Runtime choice of the CPU kernel variant. The extension is built once for any x86-64 (never tuned
// to the build host): each kernel TU is compiled for one ISA (kernels_<isa>.cpp) and the best one the
// CPU supports is called. No ISA-specific code runs before the CPU was checked for it.
#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

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
#endif

// Best first.
const Variant kVariants[] = {
#if defined(__x86_64__)
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
