package org.smolvlmedge.demo

import android.content.ActivityNotFoundException
import android.graphics.Bitmap
import android.os.Bundle
import android.os.SystemClock
import android.widget.Toast
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.view.isVisible
import androidx.lifecycle.lifecycleScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.json.JSONArray
import org.json.JSONObject
import org.smolvlmedge.demo.databinding.ActivityMainBinding
import java.io.File
import java.io.FileNotFoundException
import kotlin.concurrent.thread

/** Pick or shoot a photo, type a question, ask SmolVLM on the phone. */
class MainActivity : AppCompatActivity() {

    private lateinit var binding: ActivityMainBinding
    private var model: SmolVlmModel? = null
    private var bitmap: Bitmap? = null
    private var busy = false

    private val pickImage = registerForActivityResult(ActivityResultContracts.GetContent()) { uri ->
        if (uri != null) lifecycleScope.launch {
            try {
                show(withContext(Dispatchers.IO) { ImageUtils.load(contentResolver, uri) })
            } catch (e: Exception) {
                binding.answer.text = getString(R.string.error, e.message)
            }
        }
    }

    private val takePhoto = registerForActivityResult(ActivityResultContracts.TakePicturePreview()) { photo ->
        if (photo != null) show(ImageUtils.downscale(photo))
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        binding = ActivityMainBinding.inflate(layoutInflater)
        setContentView(binding.root)
        binding.pickButton.setOnClickListener { pickImage.launch("image/*") }
        binding.cameraButton.setOnClickListener {
            try {
                takePhoto.launch(null)
            } catch (e: ActivityNotFoundException) {
                Toast.makeText(this, R.string.no_camera_app, Toast.LENGTH_SHORT).show()
            }
        }
        binding.askButton.setOnClickListener { ask() }
        loadModel()
    }

    override fun onDestroy() {
        super.onDestroy()
        // close() waits for an answer still running on Dispatchers.Default: not on the main thread.
        model?.let { thread(name = "close-model") { it.close() } }
        model = null
    }

    private fun loadModel() = lifecycleScope.launch {
        binding.status.setText(R.string.status_loading)
        try {
            val file = withContext(Dispatchers.IO) { modelFile() }
            if (file == null) {
                binding.status.text = getString(R.string.status_missing, filesDir.path)
                return@launch
            }
            val loaded = withContext(Dispatchers.IO) {
                SmolVlmModel(
                    file.path,
                    useNnapi = BuildConfig.BACKEND == "nnapi",
                    useXnnpack = BuildConfig.BACKEND == "xnnpack",
                )
            }
            model = loaded
            val variant = getString(if (loaded.takesIds) R.string.variant_ids else R.string.variant_text)
            binding.status.text = getString(R.string.status_ready, file.name, variant, BuildConfig.BACKEND)
            updateButtons()
        } catch (e: Exception) {
            binding.status.text = getString(R.string.error, e.message)
        }
    }

    /**
     * The model in filesDir (smolvlm_mobile.onnx, or .ort for the ORT format); when the APK bundles it in
     * assets instead, it is copied there once (onnxruntime loads a model from a file path).
     */
    private fun modelFile(): File? {
        MODEL_NAMES.map { File(filesDir, it) }.firstOrNull { it.exists() }?.let { return it }
        val bundled = assets.list("").orEmpty().toSet()
        val name = MODEL_NAMES.firstOrNull { it in bundled } ?: return null
        val file = File(filesDir, name)
        val partial = File(filesDir, "$name.part") // a copy cut short never passes for the model
        assets.open(name).use { input -> partial.outputStream().use { input.copyTo(it) } }
        check(partial.renameTo(file)) { "could not rename $partial to $file" }
        return file
    }

    private fun show(photo: Bitmap) {
        bitmap = photo
        binding.image.setImageBitmap(photo)
        binding.answer.text = ""
        binding.timing.text = ""
        updateButtons()
    }

    private fun ask() {
        val model = model ?: return
        val photo = bitmap ?: return
        // The box is multi-line; the model's tokenizer refuses tabs and newlines (SmolVlmModel.answer): make them spaces.
        val question = binding.question.text?.toString().orEmpty().replace(CONTROL_WHITESPACE, " ").trim()
        setBusy(true)
        lifecycleScope.launch {
            try {
                val result = withContext(Dispatchers.Default) {
                    val image = ImageUtils.toRgb(photo)
                    if (model.takesIds) {
                        val prompt = promptIds()
                        val start = SystemClock.elapsedRealtime()
                        val ids = model.generateIds(image.bytes, image.width, image.height, prompt)
                        val text = getString(R.string.ids_answer, prompt.size, ids.joinToString(" "))
                        SmolVlmModel.Result(text, ids, SystemClock.elapsedRealtime() - start)
                    } else {
                        model.answer(image.bytes, image.width, image.height, question)
                    }
                }
                binding.answer.text = result.text
                binding.timing.text = getString(R.string.timing, result.elapsedMs, result.tokenIds.size)
            } catch (e: Exception) {
                binding.answer.text = getString(R.string.error, e.message)
            } finally {
                setBusy(false)
            }
        }
    }

    /** The prompt's token ids from assets/prompt_ids.json: `input_ids` (or `prompt_ids`), flat or [1, T]. */
    private fun promptIds(): LongArray {
        val json = try {
            assets.open(PROMPT_IDS).bufferedReader().use { it.readText() }
        } catch (e: FileNotFoundException) {
            throw IllegalStateException(getString(R.string.prompt_ids_missing), e)
        }
        val record = JSONObject(json)
        val ids: JSONArray = record.optJSONArray("input_ids") ?: record.getJSONArray("prompt_ids")
        val row = ids.optJSONArray(0) ?: ids
        return LongArray(row.length()) { row.getLong(it) }
    }

    private fun setBusy(value: Boolean) {
        busy = value
        binding.progress.isVisible = value
        updateButtons()
    }

    private fun updateButtons() {
        binding.askButton.isEnabled = !busy && model != null && bitmap != null
    }

    private companion object {
        val MODEL_NAMES = listOf("smolvlm_mobile.onnx", "smolvlm_mobile.ort")
        const val PROMPT_IDS = "prompt_ids.json"
        val CONTROL_WHITESPACE = Regex("[\\t\\n\\u000B\\f\\r\\u0085]")
    }
}
