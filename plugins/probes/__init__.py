"""Built-in circuit probes (the acronym study of García-Carrasco et al., AISTATS 2024), one module each."""
