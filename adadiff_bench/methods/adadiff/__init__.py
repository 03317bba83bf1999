"""AdaDiff in one place: the network (`network`), its uncertainty estimators (`estimators`), the exit rule and
uncertainty maps (`method`), the training objective and `[adadiff]` table (`training`), and its checkpoint
formats (`checkpoint`). Importing the package registers the method `adadiff` and its formats."""
from .checkpoint import FORMAT, OFFICIAL_FORMAT, build_adadiff, load_adadiff, save_adadiff
from .estimators import ESTIMATORS, Estimator, register_estimator
from .method import AdaDiff, AdaDiffParams
from .network import AdaDiffConfig, AdaDiffNetwork
from .training import AdaDiffTrainConfig, adadiff_losses

__all__ = ["ESTIMATORS", "FORMAT", "OFFICIAL_FORMAT", "AdaDiff", "AdaDiffConfig", "AdaDiffNetwork", "AdaDiffParams",
           "AdaDiffTrainConfig", "Estimator", "adadiff_losses", "build_adadiff", "load_adadiff", "register_estimator",
           "save_adadiff"]
