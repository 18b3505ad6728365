"""Tools around the course: chat, sample, plot, export, benchmark, assignment mode."""
