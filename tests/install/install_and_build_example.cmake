# ctest script: `cmake --install` the build into a scratch prefix, then configure and build
# examples/ with find_package(qinggeng) against that prefix and run the example.
set(prefix ${BUILD_DIR}/install-test/prefix)
set(example_build ${BUILD_DIR}/install-test/example-build)
file(REMOVE_RECURSE ${BUILD_DIR}/install-test)
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples -B ${example_build}
                        -G ${GENERATOR} -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring examples/ against the installed package failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${example_build} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building examples/ against the installed package failed (${rc})")
endif()
execute_process(COMMAND ${example_build}/score_ids ${SOURCE_DIR}/tests/fixtures/torch_tiny
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "example output: ${out}${err}")
if(rc)
  message(FATAL_ERROR "the installed-package example failed (${rc})")
endif()
