# onnxruntime for nearl: the imported target nearl_onnxruntime, and NEARL_ORT_LINK_DIR, a folder holding
# libonnxruntime.so / libonnxruntime.so.1 links to the library (the Python wheel ships only
# libonnxruntime.so.<version>, whose soname is libonnxruntime.so.1), for the linker and the loader.
#   -DONNXRUNTIME_ROOT=<dir>   an onnxruntime install or release tarball (include/ or include/onnxruntime/, lib/)
#   -DORT_INCLUDE_DIR=<dir>    the folder of onnxruntime_cxx_api.h (default: cpp/.ort/include, fetch_ort_headers.sh)
#   -DORT_LIBRARY=<file>       libonnxruntime.so* (default: the onnxruntime Python wheel's, found with Python3)
set(ONNXRUNTIME_ROOT "" CACHE PATH "onnxruntime install or release tarball (include/, lib/)")
set(ORT_INCLUDE_DIR "" CACHE PATH "folder with onnxruntime_cxx_api.h")
set(ORT_LIBRARY "" CACHE FILEPATH "libonnxruntime shared library")

if(ONNXRUNTIME_ROOT)
  find_path(_nearl_ort_include onnxruntime_cxx_api.h PATHS "${ONNXRUNTIME_ROOT}"
            PATH_SUFFIXES include include/onnxruntime NO_DEFAULT_PATH)
  find_library(_nearl_ort_library NAMES onnxruntime PATHS "${ONNXRUNTIME_ROOT}" PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
  if(NOT _nearl_ort_include OR NOT _nearl_ort_library)
    message(FATAL_ERROR "ONNXRUNTIME_ROOT=${ONNXRUNTIME_ROOT} holds no onnxruntime_cxx_api.h under include/ or no "
                        "libonnxruntime under lib/: point it at an onnxruntime release or install")
  endif()
  set(ORT_INCLUDE_DIR "${_nearl_ort_include}")
  set(ORT_LIBRARY "${_nearl_ort_library}")
endif()

if(NOT ORT_INCLUDE_DIR)
  set(ORT_INCLUDE_DIR "${CMAKE_CURRENT_LIST_DIR}/../.ort/include")
endif()
if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h")
  message(FATAL_ERROR "onnxruntime headers not found in ${ORT_INCLUDE_DIR}: run cpp/fetch_ort_headers.sh, or pass "
                      "-DORT_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h> or -DONNXRUNTIME_ROOT=<onnxruntime release>")
endif()

if(NOT ORT_LIBRARY)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import glob, os, onnxruntime; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so*')))[0])"
      OUTPUT_VARIABLE ORT_LIBRARY OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _nearl_found ERROR_QUIET)
  endif()
  if(NOT Python3_Interpreter_FOUND OR NOT _nearl_found EQUAL 0 OR NOT EXISTS "${ORT_LIBRARY}")
    message(FATAL_ERROR "onnxruntime library not found: no onnxruntime wheel for Python '${Python3_EXECUTABLE}' "
                        "(pip install onnxruntime, or -DPython3_EXECUTABLE=<venv python>), and neither "
                        "-DORT_LIBRARY=/path/to/libonnxruntime.so nor -DONNXRUNTIME_ROOT=<onnxruntime release> given")
  endif()
endif()

set(NEARL_ORT_LINK_DIR "${CMAKE_BINARY_DIR}/ort-lib")
file(MAKE_DIRECTORY "${NEARL_ORT_LINK_DIR}")
get_filename_component(_nearl_ort_real "${ORT_LIBRARY}" REALPATH)
foreach(name libonnxruntime.so libonnxruntime.so.1)
  file(CREATE_LINK "${_nearl_ort_real}" "${NEARL_ORT_LINK_DIR}/${name}" SYMBOLIC)
endforeach()
add_library(nearl_onnxruntime SHARED IMPORTED)
set_target_properties(nearl_onnxruntime PROPERTIES IMPORTED_LOCATION "${NEARL_ORT_LINK_DIR}/libonnxruntime.so"
                      IMPORTED_SONAME libonnxruntime.so.1 INTERFACE_INCLUDE_DIRECTORIES "${ORT_INCLUDE_DIR}")
message(STATUS "onnxruntime: headers ${ORT_INCLUDE_DIR}, library ${_nearl_ort_real}")
