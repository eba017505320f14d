package org.smolvlmedge.demo

import ai.onnxruntime.OnnxJavaType
import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtSession
import ai.onnxruntime.extensions.OrtxPackage
import org.json.JSONObject
import java.io.Closeable
import java.nio.ByteBuffer
import java.nio.LongBuffer

/**
 * `smolvlm_mobile.onnx`, the one-file model written by `smolvlm-edge mobile`: the graph resizes and
 * normalises the image, runs the vision tower, builds the prompt and runs the greedy decode loop itself.
 *
 * Its two variants, told apart by the inputs the model declares:
 * - text (tokenizer inside, needs onnxruntime-extensions): `image` uint8 [H, W, 3], `question` string [1],
 *   optional `max_new_tokens` int64 [] -> `answer` string [1], `generated_ids` int64 [1, N]; see [answer].
 * - ids (stock onnxruntime): `image`, `input_ids` int64 [1, T] (the prompt's token ids), optional
 *   `max_new_tokens` -> `generated_ids`; see [generateIds].
 *
 * Execution providers: the CPU, with [threads] intra-op threads, by default (usually the fastest for this
 * graph). [useNnapi] puts NNAPI first: it takes the nodes it supports and the CPU runs the rest (NNAPI is
 * deprecated from Android 15). [useXnnpack] adds XNNPACK with its own pool of [threads] threads; onnxruntime's
 * own pool then drops to one thread that does not spin, as onnxruntime recommends for XNNPACK.
 *
 * The text variant refuses, before running, a question its in-graph tokenizer would encode unlike the desktop
 * runtime it was checked against (the `tokenizer` entry of the model's `smolvlm_mobile` metadata): added-token
 * texts such as `<|im_end|>`, tabs and newlines, and for SmolLM2's tokenizer numerals other than 0-9.
 *
 * Calls are serialised; [close] waits for a running call to finish.
 */
class SmolVlmModel(
    modelPath: String,
    useNnapi: Boolean = false,
    useXnnpack: Boolean = false,
    threads: Int = 4,
) : Closeable {

    /**
     * An answer: its [text], the generated [tokenIds] (ending with the end-of-utterance id when generation
     * stopped there) and the time the call took, image to last token.
     */
    class Result(val text: String, val tokenIds: LongArray, val elapsedMs: Long)

    private val env = OrtEnvironment.getEnvironment()

    // Kept open as long as the session: closing the options unloads the custom-op library.
    private val options = OrtSession.SessionOptions().apply {
        registerCustomOpLibrary(OrtxPackage.getLibraryPath()) // string ops: tokenizer and detokenizer
        if (useNnapi) addNnapi()
        if (useXnnpack) {
            addXnnpack(mapOf("intra_op_num_threads" to threads.toString()))
            setIntraOpNumThreads(1)
            addConfigEntry("session.intra_op.allow_spinning", "0")
        } else {
            setIntraOpNumThreads(threads)
        }
    }

    private val session = try {
        env.createSession(modelPath, options)
    } catch (e: OrtException) {
        options.close()
        throw e
    }

    private val inputNames: Set<String> = session.inputNames
    private var closed = false

    init {
        if (IMAGE !in inputNames || (QUESTION !in inputNames && INPUT_IDS !in inputNames)) {
            close()
            throw IllegalArgumentException(
                "$modelPath is not a smolvlm_mobile model: its inputs are $inputNames, expected " +
                    "'$IMAGE' and '$QUESTION' (or '$INPUT_IDS'). Make it with `smolvlm-edge mobile`."
            )
        }
    }

    /** True when the model takes the prompt's token ids (no tokenizer inside): use [generateIds]. */
    val takesIds: Boolean = INPUT_IDS in inputNames

    /** The metadata's `tokenizer` entry: what the in-graph tokenizer cannot encode as the runtime does. */
    private val tokenizerLimits: JSONObject? = runCatching {
        session.metadata.customMetadata[METADATA_KEY]?.let { JSONObject(it).optJSONObject("tokenizer") }
    }.getOrNull() // a model without it (or older) only has '<image>' refused

    /** Answers [question] about an RGB image ([rgb]: [height] rows of [width] pixels, 3 bytes each). */
    @Synchronized
    fun answer(rgb: ByteArray, width: Int, height: Int, question: String, maxNewTokens: Long = 128): Result {
        check(QUESTION in inputNames) { "this model takes '$INPUT_IDS', not a question: use generateIds()" }
        require(question.isNotBlank()) { "the question is empty: type one" }
        checkQuestion(question)
        val start = System.nanoTime()
        return runSession(rgb, width, height, maxNewTokens, QUESTION) {
            OnnxTensor.createTensor(env, arrayOf(question), longArrayOf(1))
        }.use { out ->
            val text = (out.tensor(ANSWER).value as Array<*>).single() as String
            Result(text.trim(), out.longs(GENERATED_IDS), (System.nanoTime() - start) / 1_000_000)
        }
    }

    /** Greedy token ids for the prompt [inputIds] (chat template and image tokens included) and an RGB image. */
    @Synchronized
    fun generateIds(rgb: ByteArray, width: Int, height: Int, inputIds: LongArray, maxNewTokens: Long = 128): LongArray {
        check(INPUT_IDS in inputNames) { "this model takes a '$QUESTION' string, not token ids: use answer()" }
        require(inputIds.isNotEmpty()) { "inputIds is empty: pass the prompt's token ids" }
        return runSession(rgb, width, height, maxNewTokens, INPUT_IDS) {
            OnnxTensor.createTensor(env, LongBuffer.wrap(inputIds), longArrayOf(1, inputIds.size.toLong()))
        }.use { it.longs(GENERATED_IDS) }
    }

    /** Refuses what the tokenizer inside would encode unlike the runtime (as `check_question` in export/mobile_tokenizer.py). */
    private fun checkQuestion(question: String) {
        require(IMAGE_TOKEN !in question) { "the question contains '$IMAGE_TOKEN': the model places the one image itself" }
        val limits = tokenizerLimits ?: return
        val specials = limits.optJSONArray("refused_texts")
        for (i in 0 until (specials?.length() ?: 0)) {
            val special = specials!!.getString(i)
            require(special !in question) { "the question contains the special token '$special': remove it" }
        }
        val refusedChars = limits.optString("refused_chars")
        val digitsSplit = limits.optBoolean("digits_split")
        var pos = 0
        while (pos < question.length) {
            val cp = question.codePointAt(pos)
            require(cp > 0xFFFF || question[pos] !in refusedChars) {
                "the question contains a tab, newline or similar: replace it with a space"
            }
            val type = Character.getType(cp)
            val numeral = type == Character.DECIMAL_DIGIT_NUMBER.toInt() || type == Character.LETTER_NUMBER.toInt() ||
                type == Character.OTHER_NUMBER.toInt()
            require(!digitsSplit || !numeral || cp in '0'.code..'9'.code) {
                "the question contains the numeral '${String(Character.toChars(cp))}': write it with the digits 0-9"
            }
            pos += Character.charCount(cp)
        }
    }

    @Synchronized
    override fun close() {
        if (closed) return
        closed = true
        session.close()
        options.close()
    }

    /** Runs the session on the image, the prompt input [promptName] made by [prompt] and max_new_tokens if declared. */
    private fun runSession(
        rgb: ByteArray, width: Int, height: Int, maxNewTokens: Long,
        promptName: String, prompt: () -> OnnxTensor,
    ): OrtSession.Result {
        check(!closed) { "the model is closed" }
        require(width > 0 && height > 0) { "image size must be positive, got ${width}x$height" }
        val expected = width.toLong() * height * 3
        require(rgb.size.toLong() == expected) {
            "rgb has ${rgb.size} bytes, but a ${width}x$height RGB image has width * height * 3 = $expected"
        }
        require(maxNewTokens > 0) { "maxNewTokens must be positive, got $maxNewTokens" }
        val feeds = mutableMapOf<String, OnnxTensor>()
        try {
            feeds[IMAGE] = OnnxTensor.createTensor(
                env, ByteBuffer.wrap(rgb), longArrayOf(height.toLong(), width.toLong(), 3), OnnxJavaType.UINT8
            )
            feeds[promptName] = prompt()
            if (MAX_NEW_TOKENS in inputNames) {
                val scalar = longArrayOf() // shape []: max_new_tokens is a scalar
                feeds[MAX_NEW_TOKENS] = OnnxTensor.createTensor(env, LongBuffer.wrap(longArrayOf(maxNewTokens)), scalar)
            }
            return session.run(feeds)
        } finally {
            feeds.values.forEach(OnnxTensor::close)
        }
    }

    private fun OrtSession.Result.tensor(name: String): OnnxTensor =
        get(name).orElseThrow { IllegalStateException("the model has no output '$name'") } as OnnxTensor

    private fun OrtSession.Result.longs(name: String): LongArray =
        tensor(name).longBuffer.let { buffer -> LongArray(buffer.remaining()).also { buffer.get(it) } }

    private companion object {
        const val IMAGE = "image"
        const val QUESTION = "question"
        const val INPUT_IDS = "input_ids"
        const val MAX_NEW_TOKENS = "max_new_tokens"
        const val ANSWER = "answer"
        const val GENERATED_IDS = "generated_ids"
        const val METADATA_KEY = "smolvlm_mobile"
        const val IMAGE_TOKEN = "<image>"
    }
}
