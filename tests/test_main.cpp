// Catch2 main for v2; v3 links Catch2WithMain and this file is empty.
#if !defined(QG_CATCH3)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
