//! Volume engine: mirrors a volume over replica backends.
