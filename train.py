"""Train one medlite run (or a sweep with -m). Configuration lives in conf/; see README.md."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from medlite.cli import train

    return train(cfg)


if __name__ == "__main__":
    main()
