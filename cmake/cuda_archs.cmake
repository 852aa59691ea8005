# Which GPU architectures the CUDA kernels are compiled for, in CMAKE_CUDA_ARCHITECTURES syntax.
#
# First match wins:
#   1. CMAKE_CUDA_ARCHITECTURES, when the caller sets it;
#   2. LD3_CUDA_ARCHS (-DLD3_CUDA_ARCHS="86-real;90"), this project's own switch;
#   3. the CUDAARCHS environment variable (CMake's own, same syntax as CMAKE_CUDA_ARCHITECTURES);
#   4. the TORCH_CUDA_ARCH_LIST environment variable, PyTorch's convention for extensions, so a
#      user who already sets it for other extensions gets the same binaries: "7.5;8.6+PTX",
#      "8.0 9.0", "9.0a", names such as "Ampere" or "Ampere+Tegra", or "native";
#   5. the default below.
#
# The default covers the GPUs people run diffusion models on: machine code for Turing (T4), Ampere
# (A100, A10, RTX 30xx), Ada (L4, RTX 40xx) and Hopper (H100/H200), plus Hopper's PTX, which newer
# GPUs (Blackwell) compile at load time.  sm_75 is the oldest architecture CUDA 13 compiles for.
set(LD3_DEFAULT_CUDA_ARCHS "75-real;80-real;86-real;89-real;90")

# The architecture names torch's cpp_extension accepts, as its own table expands them.
set(_ld3_named_arch_kepler+tesla "3.7")
set(_ld3_named_arch_kepler "3.5+PTX")
set(_ld3_named_arch_maxwell+tegra "5.3")
set(_ld3_named_arch_maxwell "5.0;5.2+PTX")
set(_ld3_named_arch_pascal "6.0;6.1+PTX")
set(_ld3_named_arch_volta+tegra "7.2")
set(_ld3_named_arch_volta "7.0+PTX")
set(_ld3_named_arch_turing "7.5+PTX")
set(_ld3_named_arch_ampere+tegra "8.7")
set(_ld3_named_arch_ampere "8.0;8.6+PTX")
set(_ld3_named_arch_ada "8.9+PTX")
set(_ld3_named_arch_hopper "9.0+PTX")
set(_ld3_named_arch_blackwell+tegra "11.0")
set(_ld3_named_arch_blackwell "10.0;10.3;12.0;12.1+PTX")

# Translates a TORCH_CUDA_ARCH_LIST value into CMAKE_CUDA_ARCHITECTURES syntax: "X.Y" is machine code
# only ("XY-real"), "X.Y+PTX" machine code and PTX ("XY"), a trailing letter is kept ("9.0a" ->
# "90a-real").  Items may be separated by ";" or spaces.  A malformed item stops the configure with a
# message that names the variable, instead of an nvcc error about a flag the user never wrote.
function(ld3_cuda_archs_from_torch_list value out_var)
  string(STRIP "${value}" value)
  if(value STREQUAL "native")
    if(CMAKE_VERSION VERSION_LESS 3.24)
      message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST=native needs CMake >= 3.24 (this is ${CMAKE_VERSION}); "
                          "name the architectures, e.g. TORCH_CUDA_ARCH_LIST=\"8.6\"")
    endif()
    set(${out_var} "native" PARENT_SCOPE)
    return()
  endif()
  string(REPLACE " " ";" items "${value}")
  set(expanded "")
  foreach(item IN LISTS items)
    string(TOLOWER "${item}" key)
    if(DEFINED _ld3_named_arch_${key})
      list(APPEND expanded ${_ld3_named_arch_${key}})
    elseif(NOT item STREQUAL "")
      list(APPEND expanded "${item}")
    endif()
  endforeach()
  set(result "")
  foreach(item IN LISTS expanded)
    if(NOT item MATCHES "^([0-9]+)\\.([0-9])(a?)(\\+PTX)?$")
      message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST: cannot read '${item}' in '${value}'; expected compute "
                          "capabilities such as \"7.5;8.6+PTX\" or \"9.0a\", a name such as \"Ampere\", or \"native\"")
    endif()
    set(arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(CMAKE_MATCH_3 AND CMAKE_VERSION VERSION_LESS 3.25)  # CMake learnt the arch-specific "90a" in 3.25
      message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST: '${item}' (an arch-specific target) needs CMake >= 3.25, this is "
                          "${CMAKE_VERSION}")
    endif()
    if(CMAKE_MATCH_4)
      list(APPEND result "${arch}")
    else()
      list(APPEND result "${arch}-real")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES result)
  foreach(arch IN LISTS result)  # "XY" already holds XY's machine code: "8.6;8.6+PTX" is "86"
    if(NOT arch MATCHES "-real$")
      list(REMOVE_ITEM result "${arch}-real")
    endif()
  endforeach()
  if(result STREQUAL "")
    message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST='${value}' names no architecture")
  endif()
  set(${out_var} "${result}" PARENT_SCOPE)
endfunction()

# Sets CMAKE_CUDA_ARCHITECTURES (in the caller's scope) by the order above and says where it came from.
macro(ld3_choose_cuda_archs)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)  # also OFF: CMake's "pass no architecture flags"
    set(_ld3_archs_from "CMAKE_CUDA_ARCHITECTURES")
  elseif(NOT LD3_CUDA_ARCHS STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "${LD3_CUDA_ARCHS}")
    set(_ld3_archs_from "LD3_CUDA_ARCHS")
  elseif(NOT "$ENV{CUDAARCHS}" STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "$ENV{CUDAARCHS}")
    set(_ld3_archs_from "CUDAARCHS")
  elseif(NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    ld3_cuda_archs_from_torch_list("$ENV{TORCH_CUDA_ARCH_LIST}" CMAKE_CUDA_ARCHITECTURES)
    set(_ld3_archs_from "TORCH_CUDA_ARCH_LIST=$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(CMAKE_CUDA_ARCHITECTURES "${LD3_DEFAULT_CUDA_ARCHS}")
    set(_ld3_archs_from "the default")
  endif()
  message(STATUS "ld3_ext: CUDA architectures ${CMAKE_CUDA_ARCHITECTURES} (from ${_ld3_archs_from})")
  # enable_language(CUDA) would write a set CUDAARCHS into the cache, which (policy CMP0126 OLD under our
  # cmake_minimum_required) replaces the choice above and sticks in the build folder for later configures
  set(ENV{CUDAARCHS} "")
endmacro()

# Script mode, for the tests (tests/test_cuda_archs.py), printing "archs=<list>" on stdout:
#   cmake -DLD3_ARCH_LIST="7.5;8.6+PTX" -P cmake/cuda_archs.cmake      the translation of one value
#   cmake -DLD3_CHOOSE_ARCHS=ON [-DLD3_CUDA_ARCHS=...] -P cmake/cuda_archs.cmake   the choice, from the environment
if(CMAKE_SCRIPT_MODE_FILE AND CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(DEFINED LD3_ARCH_LIST)
    ld3_cuda_archs_from_torch_list("${LD3_ARCH_LIST}" _ld3_out)
    execute_process(COMMAND ${CMAKE_COMMAND} -E echo "archs=${_ld3_out}")
  elseif(LD3_CHOOSE_ARCHS)
    if(NOT DEFINED LD3_CUDA_ARCHS)
      set(LD3_CUDA_ARCHS "")
    endif()
    ld3_choose_cuda_archs()
    execute_process(COMMAND ${CMAKE_COMMAND} -E echo "archs=${CMAKE_CUDA_ARCHITECTURES}")
  endif()
endif()
