# moe_fused._torch_ops: the optional C++ fast path of the experts calls (csrc/torch/).
# AUTO builds it when the Python found here imports torch; ON requires it; OFF skips it.
# The module is bound to that torch version: a text file beside it records the version, and
# the Python loader imports the module only under the same torch (else the ctypes path runs).
set(MOE_FUSED_TORCH_OPS AUTO CACHE STRING "Build the C++ torch fast path: AUTO, ON or OFF")

if(NOT MOE_FUSED_TORCH_OPS STREQUAL "OFF")
  find_package(Python COMPONENTS Interpreter Development.Module)
  set(_moe_torch_ok OFF)
  if(Python_FOUND)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c
        "import torch, torch.utils.cpp_extension as c; print(torch.__version__); print(';'.join(c.include_paths())); print(c.library_paths()[0]); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
      RESULT_VARIABLE _moe_torch_rc OUTPUT_VARIABLE _moe_torch_out ERROR_QUIET
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_moe_torch_rc EQUAL 0)
      string(REPLACE "\n" ";" _moe_torch_lines "${_moe_torch_out}")
      list(GET _moe_torch_lines 0 MOE_TORCH_VERSION)
      list(GET _moe_torch_lines 1 _moe_torch_inc)
      list(GET _moe_torch_lines 2 _moe_torch_inc2)
      list(GET _moe_torch_lines 3 MOE_TORCH_LIBDIR)
      list(GET _moe_torch_lines 4 MOE_TORCH_CXX11_ABI)
      set(_moe_torch_ok ON)
    endif()
  endif()
  if(_moe_torch_ok)
    Python_add_library(moe_fused_torch_ops MODULE WITH_SOABI
                       ${CMAKE_CURRENT_SOURCE_DIR}/csrc/torch/torch_ops.cpp)
    set_target_properties(moe_fused_torch_ops PROPERTIES
      OUTPUT_NAME _torch_ops PREFIX ""
      LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}
      CXX_STANDARD 20  # torch's headers use C++20 features
      BUILD_RPATH "${MOE_TORCH_LIBDIR}")
    target_include_directories(moe_fused_torch_ops PRIVATE
      ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include ${_moe_torch_inc} ${_moe_torch_inc2})
    target_compile_definitions(moe_fused_torch_ops PRIVATE
      MOE_TORCH_OPS_MODULE=_torch_ops TORCH_EXTENSION_NAME=_torch_ops
      MOE_TORCH_VERSION="${MOE_TORCH_VERSION}" _GLIBCXX_USE_CXX11_ABI=${MOE_TORCH_CXX11_ABI})
    target_link_directories(moe_fused_torch_ops PRIVATE ${MOE_TORCH_LIBDIR})
    target_link_libraries(moe_fused_torch_ops PRIVATE c10 torch torch_cpu torch_python)
    set(_moe_torch_stamp ${CMAKE_BINARY_DIR}/_torch_ops.torch_version)
    file(WRITE ${_moe_torch_stamp} "${MOE_TORCH_VERSION}\n")
    if(SKBUILD)
      install(TARGETS moe_fused_torch_ops LIBRARY DESTINATION moe_fused)
      install(FILES ${_moe_torch_stamp} DESTINATION moe_fused)
    endif()
    message(STATUS "moe_fused: C++ torch fast path ON (torch ${MOE_TORCH_VERSION}, ${Python_EXECUTABLE})")
  elseif(MOE_FUSED_TORCH_OPS STREQUAL "ON")
    message(FATAL_ERROR "MOE_FUSED_TORCH_OPS=ON but the Python found (${Python_EXECUTABLE}) does not import torch")
  else()
    message(STATUS "moe_fused: C++ torch fast path OFF (no Python with torch found)")
  endif()
endif()
