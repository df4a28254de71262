"""Torch-only pieces that make training hold less memory; they import no SimpleTuner."""
