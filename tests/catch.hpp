// Includes Catch2 v2 (Debian) or v3 (Ubuntu) behind one name, so tests build against both.
#pragma once
#if defined(QG_CATCH3)
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif
