"""Loss-landscape analysis: analytic landscapes and the offset function, path geometry, figures."""
