"""flowertune-llm: the ServerApp. FlowerTune's, with one line changed: the strategy."""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from florana.flower.strategies import FloranaLoRA
from flowertune_llm.task import get_model, lora_config, settings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context.run_config)
    model = get_model(cfg)
    arrays = ArrayRecord(get_peft_model_state_dict(model))

    # stock FlowerTune: strategy = FedAvg(fraction_train=cfg["strategy.fraction-train"], fraction_evaluate=0.0)
    strategy = FloranaLoRA(method=cfg["strategy.method"], lora_config=lora_config(cfg),
                           fraction_train=cfg["strategy.fraction-train"], fraction_evaluate=0.0)

    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord({"num-server-rounds": int(cfg["num-server-rounds"])}))
    if cfg["save-path"]:
        set_peft_model_state_dict(model, result.arrays.to_torch_state_dict())
        model.save_pretrained(cfg["save-path"])
