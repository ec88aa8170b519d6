"""Loss-landscape analysis: path geometry and figures (the analytic landscapes are ``nonlocal_opt.landscapes``)."""
