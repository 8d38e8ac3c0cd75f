// Includes Catch2 v2 (Debian) or v3 (Ubuntu) behind one name, so tests build against both.
// QG_CONTAINS(s) is the substring matcher under either version's spelling.
#pragma once
#if defined(QG_CATCH3)
#include <catch2/catch_all.hpp>
using Catch::Approx;
#define QG_CONTAINS(s) Catch::Matchers::ContainsSubstring(s)
#else
#include <catch2/catch.hpp>
#define QG_CONTAINS(s) Catch::Matchers::Contains(s)
#endif
