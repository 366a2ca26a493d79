"""Model families, one package each; `flashdreams.registry` names them (the runtime never imports them directly)."""
